/**
 * The left sidebar widget: resource status, pipeline jobs started from this Lab, the registry's runs (filter, user
 * filter, refresh, auto-refresh) and the selected run's parameters, metrics, artifacts and lineage graph.
 * Plain DOM inside a Lumino widget. This file wires requests, timers and events; what the panel tracks and its
 * transitions are in state.ts, the DOM it draws in render.ts.
 */
import { Widget } from '@lumino/widgets';

import { api, ApiError, IJob, IRunDetail } from './api';
import { h } from './format';
import { renderDetail, renderJobs, renderResources, renderRunList } from './render';
import { SelectionSection } from './selection';
import * as S from './state';

export { DEFAULT_SETTINGS } from './state';
export type { IPanelSettings } from './state';

export interface IPanelOptions {
  openNotebook: (path: string) => void;
}

function errorBox(message: string): HTMLElement {
  return h('div', { class: 'llmops-error' }, message);
}

export class LlmopsPanel extends Widget {
  private state: S.IPanelState = S.initialState();
  private runsTimer: number | undefined;
  private resTimer: number | undefined;
  private jobTimer: number | undefined;
  private loadingRuns: Promise<void> | null = null;

  private readonly resourcesEl = h('div', { class: 'llmops-resources' });
  private readonly jobsEl = h('div', { class: 'llmops-jobs' });
  private readonly filterEl = h('input', {
    class: 'llmops-filter jp-mod-styled',
    type: 'search',
    placeholder: 'Filter runs (stage, status, id, metric…)'
  });
  private readonly userEl = h('select', {
    class: 'llmops-user-filter jp-mod-styled',
    title: 'Only the runs this user recorded'
  });
  private readonly autoEl = h('input', { type: 'checkbox', class: 'llmops-auto' });
  private readonly infoEl = h('span', { class: 'llmops-info' });
  private readonly listEl = h('div', { class: 'llmops-runs' });
  private readonly detailEl = h('div', { class: 'llmops-detail' });
  private readonly selection = new SelectionSection();

  constructor(private readonly options: IPanelOptions) {
    super();
    this.addClass('llmops-panel');
    this.id = 'llmops-sidebar';
    this.title.caption = 'LLMOps: runs, lineage, resources';
    const refresh = h('button', { class: 'jp-Button llmops-refresh', title: 'Refresh runs' }, '⟳ Refresh');
    refresh.addEventListener('click', () => void this.refresh());
    this.filterEl.addEventListener('input', () => this.renderRuns());
    this.userEl.addEventListener('change', () => {
      this.state = S.setUser(this.state, this.userEl.value);
      void this.refresh();
    });
    this.renderUsers();
    this.autoEl.checked = this.state.auto;
    this.autoEl.addEventListener('change', () => {
      this.state = S.setAuto(this.state, this.autoEl.checked);
      this.schedule();
    });
    this.node.append(
      h('div', { class: 'llmops-section-title' }, 'Resources'),
      this.resourcesEl,
      this.jobsEl,
      h('div', { class: 'llmops-section-title' }, 'Runs'),
      h(
        'div',
        { class: 'llmops-toolbar' },
        this.filterEl,
        this.userEl,
        refresh,
        h('label', { class: 'llmops-auto-label', title: 'Refresh periodically' }, this.autoEl, 'auto'),
        this.infoEl
      ),
      this.listEl,
      this.detailEl,
      h('div', { class: 'llmops-section-title' }, 'Model selection'),
      this.selection.node
    );
  }

  configure(settings: Partial<S.IPanelSettings>): void {
    this.state = S.configure(this.state, settings, this.autoEl.checked);
    this.autoEl.disabled = S.autoDisabled(this.state.settings);
    this.schedule();
  }

  protected onAfterAttach(): void {
    void this.refresh();
    void this.refreshResources();
    this.schedule();
  }

  protected onBeforeDetach(): void {
    window.clearInterval(this.runsTimer);
    window.clearInterval(this.resTimer);
  }

  dispose(): void {
    window.clearInterval(this.runsTimer);
    window.clearInterval(this.resTimer);
    window.clearInterval(this.jobTimer);
    super.dispose();
  }

  private schedule(): void {
    window.clearInterval(this.runsTimer);
    window.clearInterval(this.resTimer);
    if (!this.isAttached) {
      return;
    }
    const periods = S.timerPeriods(this.state);
    if (periods.runs !== null) {
      this.runsTimer = window.setInterval(() => void this.refresh(), periods.runs);
    }
    if (periods.resources !== null) {
      this.resTimer = window.setInterval(() => void this.refreshResources(), periods.resources);
    }
  }

  /** Reload the run list (and the selected run, so a running one updates); while one reload is under way, another
   * call returns that one. */
  refresh(): Promise<void> {
    if (this.loadingRuns === null) {
      this.loadingRuns = this.loadRuns().finally(() => {
        this.loadingRuns = null;
      });
    }
    return this.loadingRuns;
  }

  private async loadRuns(): Promise<void> {
    try {
      const res = await api.runs(this.state.settings.runLimit, this.state.user);
      this.state = S.runsLoaded(this.state, res.runs, res.users ?? []);
      this.renderUsers();
      this.infoEl.textContent = `${res.runs.length} runs`;
      this.infoEl.title = `registry: ${res.home}`;
      this.renderRuns();
      void this.selection.refresh();
      const reload = S.detailToReload(this.state);
      if (reload !== null) {
        await this.select(reload, false);
      }
    } catch (err) {
      this.listEl.replaceChildren(errorBox((err as ApiError).full ?? String(err)));
    }
  }

  async refreshResources(): Promise<void> {
    try {
      const res = await api.resources();
      this.resourcesEl.replaceChildren(...renderResources(res, id => void this.select(id)));
      for (const job of S.untrackedJobs(this.state, res)) {
        this.trackJob(job);
      }
    } catch (err) {
      this.resourcesEl.replaceChildren(errorBox(String((err as Error).message)));
    }
  }

  private renderUsers(): void {
    const options = S.userChoices(this.state).map(u => {
      const opt = h('option', { value: u }, u || 'all users');
      opt.selected = u === (this.state.user ?? '');
      return opt;
    });
    this.userEl.replaceChildren(...options);
  }

  private renderRuns(): void {
    this.listEl.replaceChildren(
      renderRunList(this.state, this.filterEl.value, Date.now() / 1000, id => void this.select(id))
    );
  }

  /** Show one run: parameters, metrics, artifacts, lineage. */
  async select(id: string, scroll = true): Promise<void> {
    this.state = S.select(this.state, id);
    this.listEl.querySelectorAll('.llmops-run-row').forEach(el => {
      el.classList.toggle('llmops-selected', (el as HTMLElement).dataset.runId === id);
    });
    let detail: IRunDetail;
    try {
      detail = await api.run(id);
    } catch (err) {
      this.detailEl.replaceChildren(errorBox((err as ApiError).full ?? String(err)));
      return;
    }
    this.state = S.detailLoaded(this.state, detail);
    this.detailEl.replaceChildren(
      ...renderDetail(detail, {
        openNotebook: path => this.options.openNotebook(path),
        close: () => {
          this.state = S.closeDetail(this.state);
          this.detailEl.replaceChildren();
          this.renderRuns();
        },
        select: runId => void this.select(runId),
        selectFromLineage: runId => {
          if (runId !== this.state.selected) {
            void this.select(runId);
          }
        }
      })
    );
    if (scroll) {
      this.detailEl.scrollIntoView({ block: 'nearest' });
    }
  }

  /** Follow a pipeline job started from this Lab (or found running on the server). */
  trackJob(job: IJob): void {
    this.state = S.jobUpdated(this.state, job);
    this.renderJobs();
    if (this.jobTimer === undefined) {
      this.jobTimer = window.setInterval(() => void this.pollJobs(), 1000);
    }
  }

  private async pollJobs(): Promise<void> {
    const live = S.liveJobs(this.state);
    if (!live.length) {
      window.clearInterval(this.jobTimer);
      this.jobTimer = undefined;
      return;
    }
    for (const j of live) {
      try {
        const next = await api.job(j.id);
        this.state = S.jobUpdated(this.state, next);
        if (next.status !== 'running') {
          void this.refresh();
          void this.refreshResources();
        }
      } catch {
        /* server restarted: keep the last state */
      }
    }
    this.renderJobs();
  }

  jobState(id: string): IJob | undefined {
    return this.state.jobs.get(id);
  }

  private renderJobs(): void {
    this.jobsEl.replaceChildren(
      ...renderJobs(this.state, {
        openNotebook: path => this.options.openNotebook(path),
        select: id => void this.select(id)
      })
    );
  }
}
