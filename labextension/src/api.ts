/**
 * Typed client for the server routes under /llmops (see llmops_jupyter/server): the replies' shapes and one
 * function per route. The transport (URL, auth, error mapping) is request.ts.
 */
import { requestAPI } from './request';

export { ApiError, requestAPI } from './request';

export type Metrics = Record<string, number | null>;

export interface IRunRow {
  id: string;
  stage: string;
  name: string | null;
  status: string;
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  duration_s: number | null;
  notebook: string | null;
  error: string | null;
  tags: string[];
  metrics: Metrics;
  /** who recorded the run (JUPYTERHUB_USER, LLMOPS_USER or the OS account) and on which host */
  user: string | null;
  host: string | null;
}

/** The run list's reply: the runs (filtered by the request), and every user that recorded a run. */
export interface IRunsReply {
  runs: IRunRow[];
  home: string;
  users: string[];
}

export interface IArtifact {
  hash: string;
  kind: string;
  name: string | null;
  size: number;
  run_id: string | null;
  created_at?: number;
}

export interface IGraphNode {
  hash: string;
  kind: string;
  name: string | null;
  run_id: string | null;
  size?: number;
}

export interface IGraphEdge {
  src: string;
  dst: string;
  relation: string;
  run_id: string | null;
}

export interface IGraph {
  nodes: IGraphNode[];
  edges: IGraphEdge[];
  root?: string;
}

export interface IRunDetail extends IRunRow {
  params: Record<string, unknown>;
  summary: Record<string, unknown>;
  inputs: IArtifact[];
  outputs: IArtifact[];
  lineage: IGraph;
  notebook_path: string | null;
  git_commit: string | null;
}

export interface IGpu {
  index: number;
  name: string;
  memory_used_mb: number | null;
  memory_total_mb: number | null;
  utilization_pct: number | null;
  source: string;
}

export interface IRunningRun {
  id: string;
  stage: string;
  name: string | null;
  started_at: number | null;
  metrics: Metrics;
  step: number | null;
  total_steps: number | null;
  stale: boolean;
}

export interface IJob {
  id: string;
  notebook: string;
  output: string;
  parameters: Record<string, unknown>;
  status: string;
  done: number;
  total: number | null;
  started_at: number;
  finished_at: number | null;
  run_id: string | null;
  stage_runs: string[];
  error: string | null;
}

export interface IResources {
  gpus: IGpu[];
  host: {
    cpu_count?: number;
    load_avg?: number[];
    memory_total_mb?: number;
    memory_used_mb?: number;
    cpu_pct?: number;
    source?: string;
  };
  running: IRunningRun[];
  pipelines: IJob[];
}

export interface IParam {
  name: string;
  type: string;
  default: unknown;
  help: string;
}

export const api = {
  /** The newest `limit` runs, only those `user` recorded when given. */
  runs: (limit: number, user: string | null = null) =>
    requestAPI<IRunsReply>(`runs?limit=${limit}` + (user ? `&user=${encodeURIComponent(user)}` : '')),
  run: (id: string) => requestAPI<IRunDetail>(`runs/${encodeURIComponent(id)}`),
  resources: () => requestAPI<IResources>('resources'),
  parameters: (path: string) =>
    requestAPI<{ path: string; parameters: IParam[] }>(`parameters?path=${encodeURIComponent(path)}`),
  startPipeline: (notebook: string, parameters: Record<string, unknown>) =>
    requestAPI<IJob>('pipeline', {
      method: 'POST',
      body: JSON.stringify({ notebook, parameters })
    }),
  job: (id: string) => requestAPI<IJob>(`pipeline/${encodeURIComponent(id)}`),
  jobs: () => requestAPI<{ jobs: IJob[] }>('pipeline')
};
