/**
 * The one request helper for the server routes under /llmops (see llmops_jupyter/server), shaped like the
 * JupyterLab extension template's `requestAPI`. Requests go through ServerConnection, so Jupyter's own token and
 * XSRF handling applies; an error reply `{error, field, fix}` becomes an ApiError carrying the server's message.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** The server routes' namespace under the server's base URL. */
export const API_NAMESPACE = 'llmops';

/** An error reply from the server: `{error, field, fix}`. */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly field: string | null = null,
    readonly fix: string | null = null
  ) {
    super(message);
  }

  get full(): string {
    return this.fix ? `${this.message} Fix: ${this.fix}` : this.message;
  }
}

/** Parse a reply body: JSON when it parses, the raw text otherwise, null when empty. */
export function parseBody(text: string): unknown {
  if (!text.length) {
    return null;
  }
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** The ApiError for a non-2xx reply: the server's `error` (or `message`), else the HTTP status text. */
export function errorFromReply(status: number, statusText: string, data: unknown): ApiError {
  const body = (data && typeof data === 'object' ? data : {}) as {
    error?: string;
    message?: string;
    field?: string;
    fix?: string;
  };
  return new ApiError(body.error ?? body.message ?? statusText, status, body.field ?? null, body.fix ?? null);
}

/**
 * Call a server route: `endPoint` is relative to `<baseUrl>/llmops/` (it may carry a query string).
 * Resolves with the parsed body; rejects with an ApiError for a non-2xx reply, and with ServerConnection's
 * NetworkError when the server cannot be reached.
 */
export async function requestAPI<T>(
  endPoint: string,
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, API_NAMESPACE, endPoint);
  const response = await ServerConnection.makeRequest(url, init, settings);
  const data = parseBody(await response.text());
  if (!response.ok) {
    throw errorFromReply(response.status, response.statusText, data);
  }
  return data as T;
}
