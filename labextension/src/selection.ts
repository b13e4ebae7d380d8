/**
 * The sidebar's "Model selection" section: the rows of `%llmops select` (quality, cost, latency, Pareto front)
 * over the newest eval runs, from GET /llmops/selection. Self-contained: the panel only appends the element this
 * returns and calls its refresh.
 */
import { requestAPI } from './api';
import { fmtNum, h } from './format';

export interface ISelectionRow {
  run: string;
  model: string;
  label: string;
  quality: number | null;
  cost_usd: number | null;
  cost_per_example_usd: number | null;
  latency_s: number | null;
  latency_p95_s: number | null;
  errors: number | null;
  pareto: boolean;
  why: string;
}

/** A cost, or "unknown" when no price was known (never $0). */
export function fmtUsd(v: number | null): string {
  if (v === null || v === undefined || Number.isNaN(v)) {
    return 'unknown';
  }
  return v < 0.01 ? `$${v.toFixed(6)}` : `$${v.toFixed(4)}`;
}

export function selectionTable(rows: ISelectionRow[], quality: string): HTMLElement {
  const head = ['version', quality, 'cost', 'cost / example', 'p50 latency', 'front'];
  const table = h('table', { class: 'llmops-selection-table' });
  table.append(h('tr', {}, ...head.map(c => h('th', {}, c))));
  for (const r of rows) {
    const cells = [
      r.label,
      r.quality === null ? '' : fmtNum(r.quality),
      fmtUsd(r.cost_usd),
      fmtUsd(r.cost_per_example_usd),
      r.latency_s === null ? '' : `${fmtNum(r.latency_s)} s`,
      r.pareto ? '★' : r.why
    ];
    const tr = h('tr', { class: r.pareto ? 'llmops-pareto' : '', title: `${r.run} · ${r.model}` });
    tr.append(...cells.map(c => h('td', {}, c)));
    table.append(tr);
  }
  return table;
}

export class SelectionSection {
  readonly node = h('div', { class: 'llmops-selection' });

  async refresh(quality = 'f1'): Promise<void> {
    try {
      const res = await requestAPI<{ rows: ISelectionRow[]; quality: string }>(
        `selection?quality=${encodeURIComponent(quality)}`
      );
      this.node.replaceChildren(
        res.rows.length
          ? selectionTable(res.rows, res.quality)
          : h('div', { class: 'llmops-empty' }, 'No eval runs yet.')
      );
    } catch (err) {
      this.node.replaceChildren(h('div', { class: 'llmops-error' }, String((err as Error).message)));
    }
  }
}
