/**
 * The left sidebar: resource status, pipeline jobs started from this Lab, the registry's runs (filter, refresh,
 * auto-refresh) and the selected run's parameters, metrics, artifacts and lineage graph.
 * Plain DOM inside a Lumino widget: the panel is a handful of tables, no framework needed.
 */
import { Widget } from '@lumino/widgets';

import { api, ApiError, IJob, IResources, IRunDetail, IRunRow } from './api';
import { fmtAgo, fmtBytes, fmtDuration, fmtMiB, fmtNum, h } from './format';
import { renderLineage } from './lineage';
import { SelectionSection } from './selection';

export interface IPanelOptions {
  openNotebook: (path: string) => void;
}

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

function statusBadge(status: string): HTMLElement {
  return h('span', { class: `llmops-status llmops-status-${status}` }, status);
}

function bar(fraction: number | null, label: string): HTMLElement {
  const pct = fraction === null ? 0 : Math.max(0, Math.min(1, fraction)) * 100;
  const fill = h('div', { class: 'llmops-bar-fill' });
  fill.style.width = `${pct.toFixed(1)}%`;
  const el = h('div', { class: 'llmops-bar' + (fraction === null ? ' llmops-bar-unknown' : '') }, fill);
  el.append(h('span', { class: 'llmops-bar-label' }, label));
  return el;
}

function kvTable(rows: [string, string][], cls: string): HTMLElement {
  const table = h('table', { class: `llmops-kv ${cls}` });
  for (const [k, v] of rows) {
    table.append(h('tr', {}, h('th', {}, k), h('td', {}, v)));
  }
  if (!rows.length) {
    table.append(h('tr', {}, h('td', { class: 'llmops-empty' }, '(none)')));
  }
  return table;
}

export class LlmopsPanel extends Widget {
  private settings: IPanelSettings = { ...DEFAULT_SETTINGS };
  private runs: IRunRow[] = [];
  private selected: string | null = null;
  private detail: IRunDetail | null = null;
  private jobs = new Map<string, IJob>();
  private auto = true;
  private runsTimer: number | undefined;
  private resTimer: number | undefined;
  private jobTimer: number | undefined;
  private loadingRuns = false;

  private readonly resourcesEl = h('div', { class: 'llmops-resources' });
  private readonly jobsEl = h('div', { class: 'llmops-jobs' });
  private readonly filterEl = h('input', {
    class: 'llmops-filter jp-mod-styled',
    type: 'search',
    placeholder: 'Filter runs (stage, status, id, metric…)'
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
    this.autoEl.checked = this.auto;
    this.autoEl.addEventListener('change', () => {
      this.auto = this.autoEl.checked;
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

  configure(settings: Partial<IPanelSettings>): void {
    this.settings = { ...DEFAULT_SETTINGS, ...settings };
    this.auto = this.settings.refreshInterval > 0 && this.autoEl.checked;
    this.autoEl.disabled = this.settings.refreshInterval <= 0;
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
    if (this.auto && this.settings.refreshInterval > 0) {
      this.runsTimer = window.setInterval(() => void this.refresh(), this.settings.refreshInterval * 1000);
    }
    if (this.settings.resourcesInterval > 0) {
      this.resTimer = window.setInterval(
        () => void this.refreshResources(),
        this.settings.resourcesInterval * 1000
      );
    }
  }

  /** Reload the run list (and the selected run, so a running one updates). */
  async refresh(): Promise<void> {
    if (this.loadingRuns) {
      return;
    }
    this.loadingRuns = true;
    try {
      const res = await api.runs(this.settings.runLimit);
      this.runs = res.runs;
      this.infoEl.textContent = `${res.runs.length} runs`;
      this.infoEl.title = `registry: ${res.home}`;
      this.renderRuns();
      void this.selection.refresh();
      if (this.selected && (!this.detail || this.detail.status === 'running' || this.detail.id !== this.selected)) {
        await this.select(this.selected, false);
      }
    } catch (err) {
      this.listEl.replaceChildren(h('div', { class: 'llmops-error' }, (err as ApiError).full ?? String(err)));
    } finally {
      this.loadingRuns = false;
    }
  }

  async refreshResources(): Promise<void> {
    try {
      this.renderResources(await api.resources());
    } catch (err) {
      this.resourcesEl.replaceChildren(h('div', { class: 'llmops-error' }, String((err as Error).message)));
    }
  }

  private matches(run: IRunRow, words: string[]): boolean {
    const hay = [run.id, run.stage, run.status, run.name ?? '', run.notebook ?? '', ...Object.keys(run.metrics)]
      .join(' ')
      .toLowerCase();
    return words.every(w => hay.includes(w));
  }

  private renderRuns(): void {
    const words = this.filterEl.value.toLowerCase().split(/\s+/).filter(Boolean);
    const shown = this.runs.filter(r => this.matches(r, words));
    const now = Date.now() / 1000;
    const list = h('div', { class: 'llmops-run-list' });
    for (const run of shown) {
      const metrics = Object.entries(run.metrics)
        .filter(([, v]) => v !== null)
        .slice(0, this.settings.keyMetrics)
        .map(([k, v]) => `${k}=${fmtNum(v)}`)
        .join('  ');
      const took =
        run.status === 'running' ? fmtDuration(now - (run.started_at ?? now)) : fmtDuration(run.duration_s);
      const row = h(
        'div',
        {
          class: 'llmops-run-row' + (run.id === this.selected ? ' llmops-selected' : ''),
          'data-run-id': run.id,
          'data-stage': run.stage,
          title: `${run.id}${run.name ? ' (' + run.name + ')' : ''}${run.error ? '\n' + run.error : ''}`
        },
        h(
          'div',
          { class: 'llmops-run-line' },
          h('span', { class: 'llmops-stage' }, run.stage),
          statusBadge(run.status),
          h('span', { class: 'llmops-run-name' }, run.name ?? ''),
          h('span', { class: 'llmops-started' }, fmtAgo(run.started_at ?? run.created_at, now)),
          h('span', { class: 'llmops-duration' }, took)
        ),
        metrics ? h('div', { class: 'llmops-metrics' }, metrics) : null
      );
      row.addEventListener('click', () => void this.select(run.id));
      list.append(row);
    }
    this.listEl.replaceChildren(
      shown.length ? list : h('div', { class: 'llmops-empty' }, this.runs.length ? 'No run matches the filter.' : 'No runs yet.')
    );
  }

  /** Show one run: parameters, metrics, artifacts, lineage. */
  async select(id: string, scroll = true): Promise<void> {
    this.selected = id;
    this.listEl.querySelectorAll('.llmops-run-row').forEach(el => {
      el.classList.toggle('llmops-selected', (el as HTMLElement).dataset.runId === id);
    });
    try {
      this.detail = await api.run(id);
    } catch (err) {
      this.detailEl.replaceChildren(h('div', { class: 'llmops-error' }, (err as ApiError).full ?? String(err)));
      return;
    }
    this.renderDetail(this.detail);
    if (scroll) {
      this.detailEl.scrollIntoView({ block: 'nearest' });
    }
  }

  private renderDetail(run: IRunDetail): void {
    const header = h(
      'div',
      { class: 'llmops-detail-header' },
      h('span', { class: 'llmops-detail-id' }, run.id),
      statusBadge(run.status)
    );
    const actions = h('div', { class: 'llmops-detail-actions' });
    const open = h(
      'button',
      {
        class: 'jp-Button llmops-open-notebook',
        title: run.notebook_path ? `Open ${run.notebook_path}` : 'The notebook that produced this run is not under the server root'
      },
      'Open notebook'
    );
    if (run.notebook_path) {
      const path = run.notebook_path;
      open.addEventListener('click', () => this.options.openNotebook(path));
    } else {
      open.setAttribute('disabled', 'true');
    }
    const close = h('button', { class: 'jp-Button llmops-close-detail', title: 'Close' }, '✕');
    close.addEventListener('click', () => {
      this.selected = null;
      this.detail = null;
      this.detailEl.replaceChildren();
      this.renderRuns();
    });
    actions.append(open, close);

    const info: [string, string][] = [
      ['stage', run.stage],
      ['started', run.started_at ? new Date(run.started_at * 1000).toLocaleString() : ''],
      ['duration', fmtDuration(run.duration_s)],
      ['notebook', run.notebook ?? '']
    ];
    if (run.error) {
      info.push(['error', run.error]);
    }
    const params = Object.entries(run.params).map(([k, v]) => [k, fmtNum(v)] as [string, string]);
    const metrics = Object.entries(run.metrics).map(([k, v]) => [k, fmtNum(v)] as [string, string]);
    const arts = h('ul', { class: 'llmops-artifacts' });
    for (const [role, list] of [
      ['in', run.inputs],
      ['out', run.outputs]
    ] as const) {
      for (const a of list) {
        arts.append(
          h(
            'li',
            { title: a.hash },
            h('span', { class: 'llmops-role' }, role === 'in' ? '← in' : '→ out'),
            h('span', { class: 'llmops-art-kind' }, a.kind),
            ` ${a.name ?? a.hash.slice(0, 12)} `,
            h('span', { class: 'llmops-art-size' }, fmtBytes(a.size))
          )
        );
      }
    }
    if (!arts.childElementCount) {
      arts.append(h('li', { class: 'llmops-empty' }, '(none)'));
    }
    const stageRuns = Array.isArray(run.summary.stage_runs) ? (run.summary.stage_runs as string[]) : [];
    const children = h('div', { class: 'llmops-stage-runs' });
    for (const id of stageRuns) {
      const link = h('a', { href: '#', class: 'llmops-run-link' }, id);
      link.addEventListener('click', e => {
        e.preventDefault();
        void this.select(id);
      });
      children.append(link, ' ');
    }
    const lineage = h('div', { class: 'llmops-lineage' });
    if (run.lineage.nodes.length) {
      const own = new Set([...run.outputs.map(a => a.hash)]);
      lineage.append(
        renderLineage(run.lineage, own, node => {
          if (node.run_id && node.run_id !== this.selected) {
            void this.select(node.run_id);
          }
        })
      );
    } else {
      lineage.append(h('div', { class: 'llmops-empty' }, 'No lineage recorded for this run.'));
    }
    this.detailEl.replaceChildren(
      header,
      actions,
      kvTable(info, 'llmops-info-table'),
      h('div', { class: 'llmops-subtitle' }, 'Parameters'),
      kvTable(params, 'llmops-params'),
      h('div', { class: 'llmops-subtitle' }, 'Metrics'),
      kvTable(metrics, 'llmops-metric-table'),
      h('div', { class: 'llmops-subtitle' }, 'Artifacts'),
      arts,
      stageRuns.length ? h('div', { class: 'llmops-subtitle' }, 'Stage runs') : '',
      stageRuns.length ? children : '',
      h('div', { class: 'llmops-subtitle' }, 'Lineage'),
      lineage
    );
  }

  private renderResources(res: IResources): void {
    const rows: HTMLElement[] = [];
    for (const g of res.gpus) {
      const frac =
        g.memory_used_mb !== null && g.memory_total_mb ? g.memory_used_mb / g.memory_total_mb : null;
      rows.push(
        h(
          'div',
          { class: 'llmops-gpu', title: `source: ${g.source}` },
          h('div', { class: 'llmops-res-name' }, `GPU ${g.index}: ${g.name}`),
          bar(frac, `mem ${fmtMiB(g.memory_used_mb)} / ${fmtMiB(g.memory_total_mb)}`),
          bar(g.utilization_pct === null ? null : g.utilization_pct / 100, `util ${g.utilization_pct ?? '?'}%`)
        )
      );
    }
    if (!res.gpus.length) {
      const m = res.host;
      const frac = m.memory_used_mb !== undefined && m.memory_total_mb ? m.memory_used_mb / m.memory_total_mb : null;
      rows.push(
        h(
          'div',
          { class: 'llmops-host', title: `source: ${m.source ?? '?'}` },
          h(
            'div',
            { class: 'llmops-res-name' },
            `No GPU · ${m.cpu_count ?? '?'} CPUs${m.load_avg ? ' · load ' + m.load_avg[0].toFixed(2) : ''}`
          ),
          bar(frac, `RAM ${fmtMiB(m.memory_used_mb)} / ${fmtMiB(m.memory_total_mb)}`)
        )
      );
    }
    for (const r of res.running) {
      const metrics = Object.entries(r.metrics)
        .slice(0, 3)
        .map(([k, v]) => `${k}=${fmtNum(v)}`)
        .join(' ');
      const frac = r.step !== null && r.total_steps ? r.step / r.total_steps : null;
      const label = `${r.stage} ${r.step !== null ? 'step ' + r.step + (r.total_steps ? '/' + r.total_steps : '') : ''} ${metrics}`;
      const el = h(
        'div',
        { class: 'llmops-running' + (r.stale ? ' llmops-stale' : ''), 'data-run-id': r.id, title: r.stale ? 'process is gone (stale)' : r.id },
        bar(frac, r.stale ? `${r.stage}: stale (process gone)` : label)
      );
      el.addEventListener('click', () => void this.select(r.id));
      rows.push(el);
    }
    this.resourcesEl.replaceChildren(...rows);
    for (const job of res.pipelines) {
      if (!this.jobs.has(job.id)) {
        this.trackJob(job);
      }
    }
  }

  /** Follow a pipeline job started from this Lab (or found running on the server). */
  trackJob(job: IJob): void {
    this.jobs.set(job.id, job);
    this.renderJobs();
    if (this.jobTimer === undefined) {
      this.jobTimer = window.setInterval(() => void this.pollJobs(), 1000);
    }
  }

  private async pollJobs(): Promise<void> {
    const live = Array.from(this.jobs.values()).filter(j => j.status === 'running');
    if (!live.length) {
      window.clearInterval(this.jobTimer);
      this.jobTimer = undefined;
      return;
    }
    for (const j of live) {
      try {
        const next = await api.job(j.id);
        this.jobs.set(j.id, next);
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
    return this.jobs.get(id);
  }

  private renderJobs(): void {
    const items: HTMLElement[] = [];
    for (const j of Array.from(this.jobs.values()).sort((a, b) => b.started_at - a.started_at)) {
      const frac = j.total ? j.done / j.total : null;
      const label =
        j.status === 'running'
          ? `${j.notebook}: cell ${j.done}/${j.total ?? '?'}`
          : `${j.notebook}: ${j.status}${j.error ? ' — ' + j.error : ''}`;
      const el = h(
        'div',
        { class: `llmops-job llmops-job-${j.status}`, 'data-job-id': j.id },
        bar(j.status === 'running' ? frac : 1, label)
      );
      if (j.status !== 'running') {
        const links = h('div', { class: 'llmops-job-links' });
        const out = h('a', { href: '#', class: 'llmops-job-output' }, 'output notebook');
        out.addEventListener('click', e => {
          e.preventDefault();
          this.options.openNotebook(j.output);
        });
        links.append(out);
        if (j.run_id) {
          const runId = j.run_id;
          const run = h('a', { href: '#', class: 'llmops-job-run' }, `run ${runId}`);
          run.addEventListener('click', e => {
            e.preventDefault();
            void this.select(runId);
          });
          links.append(' · ', run);
        }
        el.append(links);
      }
      items.push(el);
    }
    this.jobsEl.replaceChildren(...items);
  }
}
