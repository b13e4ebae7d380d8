/** Registry rows and replies shaped like the server's (llmops_jupyter/server), for the unit tests. */
import { IJob, IRunDetail, IRunRow } from '../api';

export function runRow(over: Partial<IRunRow> = {}): IRunRow {
  return {
    id: 'r-0001',
    stage: 'finetune',
    name: null,
    status: 'finished',
    created_at: 1000,
    started_at: 1000,
    finished_at: 1090,
    duration_s: 90,
    notebook: null,
    error: null,
    tags: [],
    metrics: {},
    user: null,
    host: null,
    ...over
  };
}

export function runDetail(over: Partial<IRunDetail> = {}): IRunDetail {
  return {
    ...runRow(),
    params: {},
    summary: {},
    inputs: [],
    outputs: [],
    lineage: { nodes: [], edges: [] },
    notebook_path: null,
    git_commit: null,
    ...over
  };
}

export function job(over: Partial<IJob> = {}): IJob {
  return {
    id: 'j1',
    notebook: 'train.ipynb',
    output: 'out/train.ipynb',
    parameters: {},
    status: 'running',
    done: 0,
    total: null,
    started_at: 100,
    finished_at: null,
    run_id: null,
    stage_runs: [],
    error: null,
    ...over
  };
}
