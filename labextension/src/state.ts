/**
 * What the sidebar tracks, as plain data and pure transitions (no DOM, no requests): the settings, the run list and
 * its filters (words, user), the selected run, auto-refresh, and the pipeline jobs followed from this Lab. The widget (panel.ts)
 * holds one IPanelState and replaces it through these functions; render.ts draws from it.
 */
import { IJob, IResources, IRunDetail, IRunningRun, IRunRow, Metrics } from './api';
import { fmtDuration, fmtNum } from './format';

export interface IPanelSettings {
  refreshInterval: number;
  resourcesInterval: number;
  runLimit: number;
  keyMetrics: number;
}

export const DEFAULT_SETTINGS: IPanelSettings = {
  refreshInterval: 10,
  resourcesInterval: 5,
  runLimit: 200,
  keyMetrics: 3
};

export interface IPanelState {
  readonly settings: IPanelSettings;
  readonly runs: readonly IRunRow[];
  readonly selected: string | null;
  readonly detail: IRunDetail | null;
  readonly jobs: ReadonlyMap<string, IJob>;
  readonly auto: boolean;
  /** the user filter: only runs this user recorded are requested (null: every user's) */
  readonly user: string | null;
  /** every user that recorded a run (from the last list reply), what the user filter offers */
  readonly users: readonly string[];
}

export function initialState(): IPanelState {
  return {
    settings: { ...DEFAULT_SETTINGS },
    runs: [],
    selected: null,
    detail: null,
    jobs: new Map(),
    auto: true,
    user: null,
    users: []
  };
}

// -- settings and auto-refresh ----------------------------------------------------------------------------------

/** New settings (missing keys take the defaults); auto-refresh stays on only if allowed and still ticked. */
export function configure(state: IPanelState, settings: Partial<IPanelSettings>, autoTicked: boolean): IPanelState {
  const merged = { ...DEFAULT_SETTINGS, ...settings };
  return { ...state, settings: merged, auto: merged.refreshInterval > 0 && autoTicked };
}

/** The "auto" checkbox is disabled when the settings turn periodic refresh off. */
export function autoDisabled(settings: IPanelSettings): boolean {
  return settings.refreshInterval <= 0;
}

export function setAuto(state: IPanelState, auto: boolean): IPanelState {
  return { ...state, auto };
}

/** Timer periods in ms (null: no timer) for the run list and the resources. */
export function timerPeriods(state: IPanelState): { runs: number | null; resources: number | null } {
  const { refreshInterval, resourcesInterval } = state.settings;
  return {
    runs: state.auto && refreshInterval > 0 ? refreshInterval * 1000 : null,
    resources: resourcesInterval > 0 ? resourcesInterval * 1000 : null
  };
}

// -- the run list and its filter ---------------------------------------------------------------------------------

export function runsLoaded(
  state: IPanelState,
  runs: readonly IRunRow[],
  users: readonly string[] = state.users
): IPanelState {
  return { ...state, runs, users };
}

/** Filter by user (null or '': every user). The list is requested again with it. */
export function setUser(state: IPanelState, user: string | null): IPanelState {
  return { ...state, user: user || null };
}

/** The user filter's choices: '' (every user), then the users, keeping the chosen one even if it has no run left. */
export function userChoices(state: IPanelState): string[] {
  const users = [...state.users];
  if (state.user !== null && !users.includes(state.user)) {
    users.push(state.user);
  }
  return ['', ...users.sort()];
}

/** The filter box's words: lower-cased, split on whitespace. */
export function filterWords(query: string): string[] {
  return query.toLowerCase().split(/\s+/).filter(Boolean);
}

/** A run matches when every word occurs in its id, stage, status, name, notebook or a metric name. */
export function runMatches(run: IRunRow, words: readonly string[]): boolean {
  const hay = [run.id, run.stage, run.status, run.name ?? '', run.notebook ?? '', ...Object.keys(run.metrics)]
    .join(' ')
    .toLowerCase();
  return words.every(w => hay.includes(w));
}

export function filterRuns(runs: readonly IRunRow[], query: string): IRunRow[] {
  const words = filterWords(query);
  return runs.filter(r => runMatches(r, words));
}

/** What the list says when no row is shown. */
export function emptyRunsMessage(total: number): string {
  return total ? 'No run matches the filter.' : 'No runs yet.';
}

/** The first `n` non-null metrics as `k=v` pairs. */
export function keyMetrics(metrics: Metrics, n: number): string {
  return Object.entries(metrics)
    .filter(([, v]) => v !== null)
    .slice(0, n)
    .map(([k, v]) => `${k}=${fmtNum(v)}`)
    .join('  ');
}

/** How long a run took, or has been running for (`now` in epoch seconds). */
export function runTook(run: IRunRow, now: number): string {
  return run.status === 'running' ? fmtDuration(now - (run.started_at ?? now)) : fmtDuration(run.duration_s);
}

export function runTitle(run: IRunRow): string {
  const by = run.user ? ` by ${run.user}${run.host ? ' on ' + run.host : ''}` : '';
  return `${run.id}${run.name ? ' (' + run.name + ')' : ''}${by}${run.error ? '\n' + run.error : ''}`;
}

// -- selection ----------------------------------------------------------------------------------------------------

/** Select a run; its detail is fetched next (the previous detail stays until then). */
export function select(state: IPanelState, id: string): IPanelState {
  return { ...state, selected: id };
}

export function detailLoaded(state: IPanelState, detail: IRunDetail): IPanelState {
  return { ...state, detail };
}

export function closeDetail(state: IPanelState): IPanelState {
  return { ...state, selected: null, detail: null };
}

/** After a list refresh, the selected run to reload: null when none is selected or its detail is loaded and final. */
export function detailToReload(state: IPanelState): string | null {
  const { selected, detail } = state;
  return selected !== null && (!detail || detail.status === 'running' || detail.id !== selected) ? selected : null;
}

/** The runs a pipeline run started (its summary's `stage_runs`). */
export function stageRuns(run: IRunDetail): string[] {
  return Array.isArray(run.summary.stage_runs) ? (run.summary.stage_runs as string[]) : [];
}

/** The info table of the detail view. */
export function detailInfo(run: IRunDetail): [string, string][] {
  const info: [string, string][] = [
    ['stage', run.stage],
    ['started', run.started_at ? new Date(run.started_at * 1000).toLocaleString() : ''],
    ['duration', fmtDuration(run.duration_s)],
    ['notebook', run.notebook ?? '']
  ];
  if (run.error) {
    info.push(['error', run.error]);
  }
  return info;
}

export function valueRows(values: Record<string, unknown>): [string, string][] {
  return Object.entries(values).map(([k, v]) => [k, fmtNum(v)] as [string, string]);
}

// -- resources ----------------------------------------------------------------------------------------------------

/** used / total, or null when either is unknown (or the total is 0). */
export function fraction(used: number | null | undefined, total: number | null | undefined): number | null {
  return used !== null && used !== undefined && total ? used / total : null;
}

/** The progress label of a running run: stage, step and its first three metrics. */
export function runningLabel(r: IRunningRun): string {
  if (r.stale) {
    return `${r.stage}: stale (process gone)`;
  }
  const metrics = Object.entries(r.metrics)
    .slice(0, 3)
    .map(([k, v]) => `${k}=${fmtNum(v)}`)
    .join(' ');
  const step = r.step !== null ? 'step ' + r.step + (r.total_steps ? '/' + r.total_steps : '') : '';
  return `${r.stage} ${step} ${metrics}`;
}

// -- pipeline jobs ------------------------------------------------------------------------------------------------

/** Follow a job (or take its newer state). */
export function jobUpdated(state: IPanelState, job: IJob): IPanelState {
  const jobs = new Map(state.jobs);
  jobs.set(job.id, job);
  return { ...state, jobs };
}

/** The server's running pipelines this panel does not follow yet. */
export function untrackedJobs(state: IPanelState, res: IResources): IJob[] {
  return res.pipelines.filter(j => !state.jobs.has(j.id));
}

/** The followed jobs still running (the ones to poll). */
export function liveJobs(state: IPanelState): IJob[] {
  return Array.from(state.jobs.values()).filter(j => j.status === 'running');
}

/** Newest first. */
export function sortedJobs(state: IPanelState): IJob[] {
  return Array.from(state.jobs.values()).sort((a, b) => b.started_at - a.started_at);
}

/** A job's bar: cells done of total while running (null when the total is unknown), full once it ended. */
export function jobFraction(j: IJob): number | null {
  return j.status === 'running' ? (j.total ? j.done / j.total : null) : 1;
}

export function jobLabel(j: IJob): string {
  return j.status === 'running'
    ? `${j.notebook}: cell ${j.done}/${j.total ?? '?'}`
    : `${j.notebook}: ${j.status}${j.error ? ' — ' + j.error : ''}`;
}
