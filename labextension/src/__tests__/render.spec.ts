/** The sidebar's DOM builders in jsdom: what they show and which callbacks their controls call. */
import { renderDetail, renderJobs, renderResources, renderRunList } from '../render';
import * as S from '../state';
import { job, runDetail, runRow } from './fixtures';

function click(el: Element | null): void {
  expect(el).not.toBeNull();
  (el as HTMLElement).click();
}

describe('renderRunList', () => {
  const state = S.select(
    S.runsLoaded(S.initialState(), [
      runRow({ id: 'r-a', stage: 'finetune', metrics: { loss: 1.25, acc: null } }),
      runRow({ id: 'r-b', stage: 'eval' })
    ]),
    'r-b'
  );

  it('draws one row per shown run, marks the selected one and selects on click', () => {
    const onSelect = jest.fn();
    const el = renderRunList(state, '', 2000, onSelect);
    const rows = el.querySelectorAll<HTMLElement>('.llmops-run-row');
    expect(Array.from(rows).map(r => r.dataset.runId)).toEqual(['r-a', 'r-b']);
    expect(Array.from(rows).map(r => r.classList.contains('llmops-selected'))).toEqual([false, true]);
    expect(rows[0].querySelector('.llmops-metrics')?.textContent).toBe('loss=1.25');
    expect(rows[1].querySelector('.llmops-metrics')).toBeNull();
    click(rows[0]);
    expect(onSelect).toHaveBeenCalledWith('r-a');
  });

  it('applies the filter and explains an empty list', () => {
    expect(renderRunList(state, 'eval', 2000, jest.fn()).querySelectorAll('.llmops-run-row')).toHaveLength(1);
    expect(renderRunList(state, 'nothing-like-this', 2000, jest.fn()).textContent).toBe('No run matches the filter.');
    expect(renderRunList(S.initialState(), '', 2000, jest.fn()).textContent).toBe('No runs yet.');
  });
});

describe('renderDetail', () => {
  const actions = () => ({
    openNotebook: jest.fn(),
    close: jest.fn(),
    select: jest.fn(),
    selectFromLineage: jest.fn()
  });
  const host = (parts: (HTMLElement | string)[]) => {
    const div = document.createElement('div');
    div.append(...parts);
    return div;
  };

  it('opens the notebook when the run has one, else disables the button', () => {
    const a = actions();
    const withPath = host(renderDetail(runDetail({ notebook_path: 'nb/train.ipynb' }), a));
    click(withPath.querySelector('.llmops-open-notebook'));
    expect(a.openNotebook).toHaveBeenCalledWith('nb/train.ipynb');
    const without = host(renderDetail(runDetail(), a));
    expect(without.querySelector('.llmops-open-notebook')?.hasAttribute('disabled')).toBe(true);
  });

  it('shows parameters, artifacts and stage-run links that select the child run', () => {
    const a = actions();
    const el = host(
      renderDetail(
        runDetail({
          params: { lr: 0.001 },
          outputs: [{ hash: 'abcdef0123456789', kind: 'adapter', name: null, size: 2048, run_id: 'r-0001' }],
          summary: { stage_runs: ['r-child'] }
        }),
        a
      )
    );
    expect(el.querySelector('.llmops-params td')?.textContent).toBe('0.001');
    expect(el.querySelector('.llmops-artifacts li')?.textContent).toBe('→ outadapter abcdef012345 2.0 KB');
    click(el.querySelector('.llmops-run-link'));
    expect(a.select).toHaveBeenCalledWith('r-child');
    click(el.querySelector('.llmops-close-detail'));
    expect(a.close).toHaveBeenCalled();
  });

  it('says when no lineage was recorded', () => {
    const el = host(renderDetail(runDetail(), actions()));
    expect(el.querySelector('.llmops-lineage')?.textContent).toBe('No lineage recorded for this run.');
    expect(el.querySelector('.llmops-stage-runs')).toBeNull();
  });
});

describe('renderResources', () => {
  it('draws the host when there is no GPU and a clickable bar per running run', () => {
    const onSelect = jest.fn();
    const rows = renderResources(
      {
        gpus: [],
        host: { cpu_count: 2, memory_total_mb: 1024, memory_used_mb: 256, load_avg: [1.5] },
        running: [
          {
            id: 'r1',
            stage: 'finetune',
            name: null,
            started_at: 1,
            metrics: {},
            step: 5,
            total_steps: 10,
            stale: false
          }
        ],
        pipelines: []
      },
      onSelect
    );
    expect(rows[0].querySelector('.llmops-res-name')?.textContent).toBe('No GPU · 2 CPUs · load 1.50');
    expect((rows[0].querySelector('.llmops-bar-fill') as HTMLElement).style.width).toBe('25.0%');
    expect((rows[1].querySelector('.llmops-bar-fill') as HTMLElement).style.width).toBe('50.0%');
    click(rows[1]);
    expect(onSelect).toHaveBeenCalledWith('r1');
  });

  it('marks an unknown GPU memory total', () => {
    const [gpu] = renderResources(
      {
        gpus: [
          { index: 0, name: 'H200', memory_used_mb: null, memory_total_mb: null, utilization_pct: 40, source: 'nvml' }
        ],
        host: {},
        running: [],
        pipelines: []
      },
      jest.fn()
    );
    const bars = gpu.querySelectorAll('.llmops-bar');
    expect(bars[0].classList.contains('llmops-bar-unknown')).toBe(true);
    expect(bars[1].classList.contains('llmops-bar-unknown')).toBe(false);
  });
});

describe('renderJobs', () => {
  it('links an ended job to its output notebook and its run', () => {
    let s = S.jobUpdated(S.initialState(), job({ id: 'live', started_at: 1 }));
    s = S.jobUpdated(s, job({ id: 'done', status: 'finished', run_id: 'r-9', started_at: 2 }));
    const actions = { openNotebook: jest.fn(), select: jest.fn() };
    const [done, live] = renderJobs(s, actions);
    expect(done.dataset.jobId).toBe('done');
    expect(live.querySelector('.llmops-job-links')).toBeNull();
    click(done.querySelector('.llmops-job-output'));
    expect(actions.openNotebook).toHaveBeenCalledWith('out/train.ipynb');
    click(done.querySelector('.llmops-job-run'));
    expect(actions.select).toHaveBeenCalledWith('r-9');
  });
});
