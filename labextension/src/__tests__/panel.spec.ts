/**
 * The widget's wiring: requests go out through the real api/requestAPI (only `fetch` is replaced by a fake server),
 * and what the panel shows follows its state. The widget is not attached, so no refresh timer runs.
 */
import { PageConfig } from '@jupyterlab/coreutils';

import { IRunDetail, IRunRow } from '../api';
import { LlmopsPanel } from '../panel';
import { runDetail, runRow } from './fixtures';

interface IFakeServer {
  runs: IRunRow[];
  details: Record<string, IRunDetail>;
  /** A reply that replaces the run list's: [status, body]. */
  runsError?: [number, unknown];
  requested: string[];
}

function serve(server: IFakeServer): void {
  PageConfig.setOption('baseUrl', '/');
  jest.spyOn(globalThis, 'fetch').mockImplementation(async input => {
    const url = new URL((input as Request).url);
    const path = url.pathname;
    const user = url.searchParams.get('user');
    server.requested.push(path + (user ? `?user=${user}` : ''));
    const json = (body: unknown, status = 200) => new Response(JSON.stringify(body), { status });
    if (path === '/llmops/selection') {
      return json({ rows: [], quality: 'exact_match' });
    }
    if (path === '/llmops/runs') {
      const users = [...new Set(server.runs.map(r => r.user).filter(u => u !== null))];
      return server.runsError
        ? json(server.runsError[1], server.runsError[0])
        : json({ runs: server.runs.filter(r => !user || r.user === user), home: '/h', users });
    }
    const id = decodeURIComponent(path.replace('/llmops/runs/', ''));
    return server.details[id] ? json(server.details[id]) : json({ error: `no run ${id}` }, 404);
  });
}

/** The run requests a refresh made (the model-selection section refreshes beside them, on its own). */
function runRequests(server: IFakeServer): string[] {
  return server.requested.filter(p => p.startsWith('/llmops/runs'));
}

function rows(panel: LlmopsPanel): string[] {
  return Array.from(panel.node.querySelectorAll<HTMLElement>('.llmops-run-row')).map(r => r.dataset.runId!);
}

function makeServer(): IFakeServer {
  return {
    runs: [
      runRow({ id: 'r-a', stage: 'finetune', status: 'running', user: 'grace', host: 'gpu-1' }),
      runRow({ id: 'r-b', stage: 'eval', user: 'ada' })
    ],
    details: {
      'r-a': runDetail({ id: 'r-a', status: 'running', params: { lr: 0.001 } }),
      'r-b': runDetail({ id: 'r-b', stage: 'eval' })
    },
    requested: []
  };
}

afterEach(() => jest.restoreAllMocks());

describe('LlmopsPanel', () => {
  it('lists the runs and filters them as the filter box changes', async () => {
    serve(makeServer());
    const panel = new LlmopsPanel({ openNotebook: jest.fn() });
    await panel.refresh();
    expect(rows(panel)).toEqual(['r-a', 'r-b']);
    expect(panel.node.querySelector('.llmops-info')?.textContent).toBe('2 runs');
    const filter = panel.node.querySelector<HTMLInputElement>('.llmops-filter')!;
    filter.value = 'EVAL';
    filter.dispatchEvent(new Event('input'));
    expect(rows(panel)).toEqual(['r-b']);
    panel.dispose();
  });

  it("offers every recorded user and asks the server for one user's runs", async () => {
    const server = makeServer();
    serve(server);
    const panel = new LlmopsPanel({ openNotebook: jest.fn() });
    await panel.refresh();
    const users = panel.node.querySelector<HTMLSelectElement>('.llmops-user-filter')!;
    expect(Array.from(users.options).map(o => [o.value, o.textContent])).toEqual([
      ['', 'all users'],
      ['ada', 'ada'],
      ['grace', 'grace']
    ]);
    expect(panel.node.querySelector('.llmops-run-row')?.getAttribute('title')).toBe('r-a by grace on gpu-1');

    server.requested.length = 0;
    users.value = 'grace';
    users.dispatchEvent(new Event('change'));
    await panel.refresh(); // the reload the change started
    expect(runRequests(server)).toEqual(['/llmops/runs?user=grace']);
    expect(rows(panel)).toEqual(['r-a']);
    expect(users.value).toBe('grace');
    expect(panel.node.querySelector('.llmops-info')?.textContent).toBe('1 runs');

    users.value = '';
    server.requested.length = 0;
    users.dispatchEvent(new Event('change'));
    await panel.refresh();
    expect(rows(panel)).toEqual(['r-a', 'r-b']);
    expect(runRequests(server)).toEqual(['/llmops/runs']);
    panel.dispose();
  });

  it('asks for the configured number of runs', async () => {
    const server = makeServer();
    serve(server);
    const panel = new LlmopsPanel({ openNotebook: jest.fn() });
    panel.configure({ runLimit: 7 });
    await panel.refresh();
    const url = new URL(((globalThis.fetch as jest.Mock).mock.calls[0][0] as Request).url);
    expect(url.searchParams.get('limit')).toBe('7');
    panel.dispose();
  });

  it('shows the selected run, reloads it while it runs, and closes it', async () => {
    const server = makeServer();
    serve(server);
    const panel = new LlmopsPanel({ openNotebook: jest.fn() });
    await panel.refresh();
    await panel.select('r-a', false);
    expect(panel.node.querySelector('.llmops-detail-id')?.textContent).toBe('r-a');
    expect(panel.node.querySelector('.llmops-run-row.llmops-selected')?.getAttribute('data-run-id')).toBe('r-a');

    server.requested.length = 0;
    await panel.refresh(); // r-a is running: its detail is fetched again
    expect(runRequests(server)).toEqual(['/llmops/runs', '/llmops/runs/r-a']);
    expect(server.requested).toContain('/llmops/selection');

    await panel.select('r-b', false);
    server.requested.length = 0;
    await panel.refresh(); // r-b is finished: only the list
    expect(runRequests(server)).toEqual(['/llmops/runs']);
    expect(panel.node.querySelector('.llmops-run-row.llmops-selected')?.getAttribute('data-run-id')).toBe('r-b');

    panel.node.querySelector<HTMLElement>('.llmops-close-detail')!.click();
    expect(panel.node.querySelector('.llmops-detail')?.childElementCount).toBe(0);
    expect(panel.node.querySelector('.llmops-selected')).toBeNull();
    server.requested.length = 0;
    await panel.refresh();
    expect(runRequests(server)).toEqual(['/llmops/runs']);
    panel.dispose();
  });

  it("shows the server's error and its fix", async () => {
    const server = makeServer();
    server.runsError = [500, { error: 'registry is locked', fix: 'close the other writer' }];
    serve(server);
    const panel = new LlmopsPanel({ openNotebook: jest.fn() });
    await panel.refresh();
    expect(panel.node.querySelector('.llmops-runs .llmops-error')?.textContent).toBe(
      'registry is locked Fix: close the other writer'
    );
    await panel.select('r-missing', false);
    expect(panel.node.querySelector('.llmops-detail .llmops-error')?.textContent).toBe('no run r-missing');
    panel.dispose();
  });
});
