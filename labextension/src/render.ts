/**
 * The sidebar's DOM: each function builds one part (run list, run detail, resources, jobs) from the panel's state
 * and the callbacks it is given; none keeps state or makes requests.
 */
import { IArtifact, IJob, IResources, IRunDetail } from './api';
import { fmtAgo, fmtBytes, fmtMiB, h } from './format';
import { renderLineage } from './lineage';
import {
  detailInfo,
  emptyRunsMessage,
  filterRuns,
  fraction,
  IPanelState,
  jobFraction,
  jobLabel,
  keyMetrics,
  runningLabel,
  runTitle,
  runTook,
  sortedJobs,
  stageRuns,
  valueRows
} from './state';

export function statusBadge(status: string): HTMLElement {
  return h('span', { class: `llmops-status llmops-status-${status}` }, status);
}

export function bar(fraction: number | null, label: string): HTMLElement {
  const pct = fraction === null ? 0 : Math.max(0, Math.min(1, fraction)) * 100;
  const fill = h('div', { class: 'llmops-bar-fill' });
  fill.style.width = `${pct.toFixed(1)}%`;
  const el = h('div', { class: 'llmops-bar' + (fraction === null ? ' llmops-bar-unknown' : '') }, fill);
  el.append(h('span', { class: 'llmops-bar-label' }, label));
  return el;
}

export function kvTable(rows: [string, string][], cls: string): HTMLElement {
  const table = h('table', { class: `llmops-kv ${cls}` });
  for (const [k, v] of rows) {
    table.append(h('tr', {}, h('th', {}, k), h('td', {}, v)));
  }
  if (!rows.length) {
    table.append(h('tr', {}, h('td', { class: 'llmops-empty' }, '(none)')));
  }
  return table;
}

function link(cls: string, text: string, onClick: () => void): HTMLAnchorElement {
  const a = h('a', { href: '#', class: cls }, text);
  a.addEventListener('click', e => {
    e.preventDefault();
    onClick();
  });
  return a;
}

/** The run list filtered by `query` (or the empty-list message), the selected run marked. */
export function renderRunList(
  state: IPanelState,
  query: string,
  now: number,
  onSelect: (id: string) => void
): HTMLElement {
  const shown = filterRuns(state.runs, query);
  if (!shown.length) {
    return h('div', { class: 'llmops-empty' }, emptyRunsMessage(state.runs.length));
  }
  const list = h('div', { class: 'llmops-run-list' });
  for (const run of shown) {
    const metrics = keyMetrics(run.metrics, state.settings.keyMetrics);
    const row = h(
      'div',
      {
        class: 'llmops-run-row' + (run.id === state.selected ? ' llmops-selected' : ''),
        'data-run-id': run.id,
        'data-stage': run.stage,
        title: runTitle(run)
      },
      h(
        'div',
        { class: 'llmops-run-line' },
        h('span', { class: 'llmops-stage' }, run.stage),
        statusBadge(run.status),
        h('span', { class: 'llmops-run-name' }, run.name ?? ''),
        h('span', { class: 'llmops-started' }, fmtAgo(run.started_at ?? run.created_at, now)),
        h('span', { class: 'llmops-duration' }, runTook(run, now))
      ),
      metrics ? h('div', { class: 'llmops-metrics' }, metrics) : null
    );
    row.addEventListener('click', () => onSelect(run.id));
    list.append(row);
  }
  return list;
}

export interface IDetailActions {
  openNotebook: (path: string) => void;
  close: () => void;
  /** A stage-run link or a lineage node with a run was clicked. */
  select: (id: string) => void;
  /** A lineage node of another run was clicked. */
  selectFromLineage: (id: string) => void;
}

function artifactList(run: IRunDetail): HTMLElement {
  const arts = h('ul', { class: 'llmops-artifacts' });
  const groups: [string, IArtifact[]][] = [
    ['in', run.inputs],
    ['out', run.outputs]
  ];
  for (const [role, list] of groups) {
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
  return arts;
}

/** One run: header, actions, info, parameters, metrics, artifacts, stage runs and the lineage graph. */
export function renderDetail(run: IRunDetail, actions: IDetailActions): (HTMLElement | string)[] {
  const header = h(
    'div',
    { class: 'llmops-detail-header' },
    h('span', { class: 'llmops-detail-id' }, run.id),
    statusBadge(run.status)
  );
  const buttons = h('div', { class: 'llmops-detail-actions' });
  const open = h(
    'button',
    {
      class: 'jp-Button llmops-open-notebook',
      title: run.notebook_path
        ? `Open ${run.notebook_path}`
        : 'The notebook that produced this run is not under the server root'
    },
    'Open notebook'
  );
  if (run.notebook_path) {
    const path = run.notebook_path;
    open.addEventListener('click', () => actions.openNotebook(path));
  } else {
    open.setAttribute('disabled', 'true');
  }
  const close = h('button', { class: 'jp-Button llmops-close-detail', title: 'Close' }, '✕');
  close.addEventListener('click', () => actions.close());
  buttons.append(open, close);

  const children = stageRuns(run);
  const childLinks = h('div', { class: 'llmops-stage-runs' });
  for (const id of children) {
    childLinks.append(
      link('llmops-run-link', id, () => actions.select(id)),
      ' '
    );
  }
  const lineage = h('div', { class: 'llmops-lineage' });
  if (run.lineage.nodes.length) {
    const own = new Set([...run.outputs.map(a => a.hash)]);
    lineage.append(
      renderLineage(run.lineage, own, node => {
        if (node.run_id) {
          actions.selectFromLineage(node.run_id);
        }
      })
    );
  } else {
    lineage.append(h('div', { class: 'llmops-empty' }, 'No lineage recorded for this run.'));
  }
  return [
    header,
    buttons,
    kvTable(detailInfo(run), 'llmops-info-table'),
    h('div', { class: 'llmops-subtitle' }, 'Parameters'),
    kvTable(valueRows(run.params), 'llmops-params'),
    h('div', { class: 'llmops-subtitle' }, 'Metrics'),
    kvTable(valueRows(run.metrics), 'llmops-metric-table'),
    h('div', { class: 'llmops-subtitle' }, 'Artifacts'),
    artifactList(run),
    children.length ? h('div', { class: 'llmops-subtitle' }, 'Stage runs') : '',
    children.length ? childLinks : '',
    h('div', { class: 'llmops-subtitle' }, 'Lineage'),
    lineage
  ];
}

/** GPUs (or the host when there is none), then one bar per running run. */
export function renderResources(res: IResources, onSelect: (id: string) => void): HTMLElement[] {
  const rows: HTMLElement[] = [];
  for (const g of res.gpus) {
    rows.push(
      h(
        'div',
        { class: 'llmops-gpu', title: `source: ${g.source}` },
        h('div', { class: 'llmops-res-name' }, `GPU ${g.index}: ${g.name}`),
        bar(
          fraction(g.memory_used_mb, g.memory_total_mb),
          `mem ${fmtMiB(g.memory_used_mb)} / ${fmtMiB(g.memory_total_mb)}`
        ),
        bar(g.utilization_pct === null ? null : g.utilization_pct / 100, `util ${g.utilization_pct ?? '?'}%`)
      )
    );
  }
  if (!res.gpus.length) {
    const m = res.host;
    rows.push(
      h(
        'div',
        { class: 'llmops-host', title: `source: ${m.source ?? '?'}` },
        h(
          'div',
          { class: 'llmops-res-name' },
          `No GPU · ${m.cpu_count ?? '?'} CPUs${m.load_avg ? ' · load ' + m.load_avg[0].toFixed(2) : ''}`
        ),
        bar(
          fraction(m.memory_used_mb, m.memory_total_mb),
          `RAM ${fmtMiB(m.memory_used_mb)} / ${fmtMiB(m.memory_total_mb)}`
        )
      )
    );
  }
  for (const r of res.running) {
    const el = h(
      'div',
      {
        class: 'llmops-running' + (r.stale ? ' llmops-stale' : ''),
        'data-run-id': r.id,
        title: r.stale ? 'process is gone (stale)' : r.id
      },
      bar(fraction(r.step, r.total_steps), runningLabel(r))
    );
    el.addEventListener('click', () => onSelect(r.id));
    rows.push(el);
  }
  return rows;
}

export interface IJobActions {
  openNotebook: (path: string) => void;
  select: (id: string) => void;
}

/** The followed pipeline jobs, newest first; an ended one links its output notebook and its run. */
export function renderJobs(state: IPanelState, actions: IJobActions): HTMLElement[] {
  return sortedJobs(state).map((j: IJob) => {
    const el = h(
      'div',
      { class: `llmops-job llmops-job-${j.status}`, 'data-job-id': j.id },
      bar(jobFraction(j), jobLabel(j))
    );
    if (j.status !== 'running') {
      const links = h('div', { class: 'llmops-job-links' });
      links.append(link('llmops-job-output', 'output notebook', () => actions.openNotebook(j.output)));
      if (j.run_id) {
        const runId = j.run_id;
        links.append(
          ' · ',
          link('llmops-job-run', `run ${runId}`, () => actions.select(runId))
        );
      }
      el.append(links);
    }
    return el;
  });
}
