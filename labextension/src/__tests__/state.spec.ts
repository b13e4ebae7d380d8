/** The panel's state: pure transitions and the values the sidebar derives from it. */
import * as S from '../state';
import { job, runDetail, runRow } from './fixtures';

const runs = [
  runRow({ id: 'r-a', stage: 'finetune', status: 'finished', name: 'lora-smol', metrics: { loss: 1.2 } }),
  runRow({ id: 'r-b', stage: 'eval', status: 'failed', notebook: 'Eval.ipynb', metrics: { accuracy: 0.5 } }),
  runRow({ id: 'r-c', stage: 'finetune', status: 'running', metrics: {} })
];

describe('user filter', () => {
  it('starts on every user and keeps the users of the last reply', () => {
    const s0 = S.initialState();
    expect(s0.user).toBeNull();
    expect(S.userChoices(s0)).toEqual(['']);
    const s1 = S.runsLoaded(s0, runs, ['grace', 'ada']);
    expect(S.userChoices(s1)).toEqual(['', 'ada', 'grace']);
    expect(S.runsLoaded(s1, []).users).toEqual(['grace', 'ada']);
  });

  it('sets and clears the user; a chosen user stays offered when none of their runs is left', () => {
    const s1 = S.setUser(S.runsLoaded(S.initialState(), runs, ['ada']), 'grace');
    expect(s1.user).toBe('grace');
    expect(S.userChoices(s1)).toEqual(['', 'ada', 'grace']);
    expect(S.setUser(s1, '').user).toBeNull();
    expect(S.setUser(s1, null).user).toBeNull();
  });

  it('names the user and host in a row title', () => {
    expect(S.runTitle(runRow({ id: 'r-x', user: 'ada', host: 'gpu-1' }))).toBe('r-x by ada on gpu-1');
    expect(S.runTitle(runRow({ id: 'r-x', user: 'ada' }))).toBe('r-x by ada');
    expect(S.runTitle(runRow({ id: 'r-x' }))).toBe('r-x');
  });
});

describe('filter', () => {
  const ids = (query: string) => S.filterRuns(runs, query).map(r => r.id);

  it('shows every run for an empty or blank query', () => {
    expect(ids('')).toEqual(['r-a', 'r-b', 'r-c']);
    expect(ids('   ')).toEqual(['r-a', 'r-b', 'r-c']);
  });

  it('matches stage, status, id, name, notebook and metric names, case-insensitively', () => {
    expect(ids('finetune')).toEqual(['r-a', 'r-c']);
    expect(ids('FAILED')).toEqual(['r-b']);
    expect(ids('r-c')).toEqual(['r-c']);
    expect(ids('smol')).toEqual(['r-a']);
    expect(ids('eval.ipynb')).toEqual(['r-b']);
    expect(ids('accuracy')).toEqual(['r-b']);
  });

  it('needs every word to match', () => {
    expect(ids('finetune running')).toEqual(['r-c']);
    expect(ids('finetune  loss')).toEqual(['r-a']);
    expect(ids('eval loss')).toEqual([]);
  });

  it('does not match metric values', () => {
    expect(ids('1.2')).toEqual([]);
  });

  it('says why the list is empty', () => {
    expect(S.emptyRunsMessage(0)).toBe('No runs yet.');
    expect(S.emptyRunsMessage(3)).toBe('No run matches the filter.');
  });
});

describe('run row values', () => {
  it('keyMetrics skips null values and keeps the first n', () => {
    expect(S.keyMetrics({ a: 1, b: null, c: 0.25, d: 4 }, 2)).toBe('a=1  c=0.25');
    expect(S.keyMetrics({ a: null }, 3)).toBe('');
  });

  it('runTook counts a running run from its start, a finished one by its duration', () => {
    expect(S.runTook(runRow({ status: 'running', started_at: 1000, duration_s: null }), 1030)).toBe('30.0 s');
    expect(S.runTook(runRow({ status: 'finished', duration_s: 125 }), 99999)).toBe('2 m 5 s');
    expect(S.runTook(runRow({ status: 'failed', duration_s: null }), 99999)).toBe('');
  });

  it('runTitle names the run and its error', () => {
    expect(S.runTitle(runRow({ id: 'r1' }))).toBe('r1');
    expect(S.runTitle(runRow({ id: 'r1', name: 'n', error: 'boom' }))).toBe('r1 (n)\nboom');
  });
});

describe('settings and auto-refresh', () => {
  it('starts from the defaults with auto-refresh on', () => {
    const s = S.initialState();
    expect(s.settings).toEqual(S.DEFAULT_SETTINGS);
    expect(s.auto).toBe(true);
    expect(S.timerPeriods(s)).toEqual({ runs: 10000, resources: 5000 });
  });

  it('fills missing settings from the defaults', () => {
    const s = S.configure(S.initialState(), { runLimit: 50 }, true);
    expect(s.settings).toEqual({ ...S.DEFAULT_SETTINGS, runLimit: 50 });
  });

  it('turns periodic refresh off when the interval is 0, whatever the checkbox says', () => {
    const s = S.configure(S.initialState(), { refreshInterval: 0, resourcesInterval: 0 }, true);
    expect(s.auto).toBe(false);
    expect(S.autoDisabled(s.settings)).toBe(true);
    expect(S.timerPeriods(s)).toEqual({ runs: null, resources: null });
  });

  it('follows the checkbox otherwise', () => {
    const off = S.configure(S.initialState(), { refreshInterval: 3 }, false);
    expect(off.auto).toBe(false);
    expect(S.autoDisabled(off.settings)).toBe(false);
    expect(S.timerPeriods(off).runs).toBeNull();
    const on = S.setAuto(off, true);
    expect(S.timerPeriods(on).runs).toBe(3000);
    expect(off.auto).toBe(false); // transitions return a new state
  });
});

describe('selection', () => {
  const loaded = S.runsLoaded(S.initialState(), runs);

  it('selecting keeps the list and the previous detail until the new one arrives', () => {
    const withDetail = S.detailLoaded(S.select(loaded, 'r-a'), runDetail({ id: 'r-a' }));
    const next = S.select(withDetail, 'r-b');
    expect(next.selected).toBe('r-b');
    expect(next.detail?.id).toBe('r-a');
    expect(next.runs).toBe(loaded.runs);
    expect(withDetail.selected).toBe('r-a');
  });

  it('closing clears selection and detail', () => {
    const s = S.closeDetail(S.detailLoaded(S.select(loaded, 'r-a'), runDetail({ id: 'r-a' })));
    expect(s.selected).toBeNull();
    expect(s.detail).toBeNull();
  });

  it('a refresh reloads the selected run unless its detail is loaded and final', () => {
    expect(S.detailToReload(loaded)).toBeNull(); // nothing selected
    const selected = S.select(loaded, 'r-a');
    expect(S.detailToReload(selected)).toBe('r-a'); // not loaded yet
    expect(S.detailToReload(S.detailLoaded(selected, runDetail({ id: 'r-a', status: 'finished' })))).toBeNull();
    expect(S.detailToReload(S.detailLoaded(selected, runDetail({ id: 'r-a', status: 'running' })))).toBe('r-a');
    expect(S.detailToReload(S.detailLoaded(selected, runDetail({ id: 'r-other' })))).toBe('r-a');
  });

  it('stageRuns reads summary.stage_runs only when it is a list', () => {
    expect(S.stageRuns(runDetail({ summary: { stage_runs: ['r1', 'r2'] } }))).toEqual(['r1', 'r2']);
    expect(S.stageRuns(runDetail({ summary: { stage_runs: 'r1' } }))).toEqual([]);
    expect(S.stageRuns(runDetail())).toEqual([]);
  });

  it('detailInfo lists the error only when there is one', () => {
    const keys = (d = runDetail()) => S.detailInfo(d).map(([k]) => k);
    expect(keys()).toEqual(['stage', 'started', 'duration', 'notebook']);
    expect(S.detailInfo(runDetail({ error: 'OOM' })).pop()).toEqual(['error', 'OOM']);
    expect(S.detailInfo(runDetail({ started_at: null }))[1]).toEqual(['started', '']);
  });

  it('valueRows formats params and metrics', () => {
    expect(S.valueRows({ lr: 0.0002, steps: 50, name: 'x', none: null, list: [1, 2] })).toEqual([
      ['lr', '2.00e-4'],
      ['steps', '50'],
      ['name', 'x'],
      ['none', ''],
      ['list', '[1,2]']
    ]);
  });
});

describe('resources', () => {
  it('fraction is null when a value is unknown or the total is 0', () => {
    expect(S.fraction(512, 1024)).toBe(0.5);
    expect(S.fraction(0, 1024)).toBe(0);
    expect(S.fraction(null, 1024)).toBeNull();
    expect(S.fraction(undefined, 1024)).toBeNull();
    expect(S.fraction(5, 0)).toBeNull();
    expect(S.fraction(5, null)).toBeNull();
  });

  it('runningLabel shows step, total and the first three metrics, or that the process is gone', () => {
    const r = {
      id: 'r1',
      stage: 'finetune',
      name: null,
      started_at: 1,
      metrics: { loss: 1.5, lr: 0.0002, grad_norm: 0.5, epoch: 1 },
      step: 7,
      total_steps: 50,
      stale: false
    };
    expect(S.runningLabel(r)).toBe('finetune step 7/50 loss=1.5 lr=2.00e-4 grad_norm=0.5');
    expect(S.runningLabel({ ...r, total_steps: null, metrics: {} })).toBe('finetune step 7 ');
    expect(S.runningLabel({ ...r, stale: true })).toBe('finetune: stale (process gone)');
  });
});

describe('pipeline jobs', () => {
  it('tracks a job and replaces it with its newer state without touching the old state', () => {
    const s0 = S.initialState();
    const s1 = S.jobUpdated(s0, job({ id: 'j1', done: 1 }));
    const s2 = S.jobUpdated(s1, job({ id: 'j1', done: 2 }));
    expect(s0.jobs.size).toBe(0);
    expect(s1.jobs.get('j1')?.done).toBe(1);
    expect(s2.jobs.get('j1')?.done).toBe(2);
    expect(s2.jobs.size).toBe(1);
  });

  it('picks up only the server pipelines it does not follow yet', () => {
    const s = S.jobUpdated(S.initialState(), job({ id: 'j1' }));
    const res = { gpus: [], host: {}, running: [], pipelines: [job({ id: 'j1' }), job({ id: 'j2' })] };
    expect(S.untrackedJobs(s, res).map(j => j.id)).toEqual(['j2']);
  });

  it('polls only running jobs and lists newest first', () => {
    let s = S.initialState();
    s = S.jobUpdated(s, job({ id: 'old', started_at: 1, status: 'finished' }));
    s = S.jobUpdated(s, job({ id: 'new', started_at: 3 }));
    s = S.jobUpdated(s, job({ id: 'mid', started_at: 2, status: 'failed' }));
    expect(S.liveJobs(s).map(j => j.id)).toEqual(['new']);
    expect(S.sortedJobs(s).map(j => j.id)).toEqual(['new', 'mid', 'old']);
  });

  it("a job's bar and label follow its progress, then its outcome", () => {
    expect(S.jobFraction(job({ done: 3, total: 12 }))).toBe(0.25);
    expect(S.jobFraction(job({ done: 3, total: null }))).toBeNull();
    expect(S.jobFraction(job({ status: 'failed', done: 3, total: 12 }))).toBe(1);
    expect(S.jobLabel(job({ done: 3, total: null }))).toBe('train.ipynb: cell 3/?');
    expect(S.jobLabel(job({ status: 'failed', error: 'cell 4 raised' }))).toBe('train.ipynb: failed — cell 4 raised');
    expect(S.jobLabel(job({ status: 'finished' }))).toBe('train.ipynb: finished');
  });
});
