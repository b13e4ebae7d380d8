/**
 * The request helper against Jupyter's real ServerConnection: only `fetch` (the network boundary) is replaced, so
 * URL building, the token and XSRF headers and the error mapping are what the Lab sends and sees.
 */
import { PageConfig } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { api } from '../api';
import { ApiError, errorFromReply, parseBody, requestAPI } from '../request';

type FetchMock = jest.Mock<Promise<Response>, [RequestInfo, RequestInit?]>;

function reply(body: string, status = 200, statusText = 'OK'): FetchMock {
  return jest.fn<Promise<Response>, [RequestInfo, RequestInit?]>(
    async () => new Response(body, { status, statusText })
  );
}

function settingsWith(fetch: FetchMock, token = ''): ServerConnection.ISettings {
  return ServerConnection.makeSettings({ baseUrl: 'http://lab.test/user/me/', token, fetch });
}

function sent(fetch: FetchMock): Request {
  expect(fetch).toHaveBeenCalledTimes(1);
  return fetch.mock.calls[0][0] as Request;
}

/** The error a request rejects with (failing the test if it resolves). */
async function failure(p: Promise<unknown>): Promise<ApiError> {
  return p.then(
    value => {
      throw new Error(`expected a rejection, got ${JSON.stringify(value)}`);
    },
    (err: ApiError) => err
  );
}

afterEach(() => {
  document.cookie = '_xsrf=; expires=Thu, 01 Jan 1970 00:00:00 GMT';
  jest.restoreAllMocks();
});

describe('requestAPI', () => {
  it('puts the route under <baseUrl>/llmops/ and keeps its query string', async () => {
    const fetch = reply('{"runs": [], "home": "/reg"}');
    await requestAPI('runs?limit=5', {}, settingsWith(fetch));
    const url = new URL(sent(fetch).url);
    expect(url.origin + url.pathname).toBe('http://lab.test/user/me/llmops/runs');
    expect(url.searchParams.get('limit')).toBe('5');
  });

  it('sends the token and the XSRF cookie as Jupyter expects', async () => {
    document.cookie = '_xsrf=xsrf-value';
    const fetch = reply('{}');
    await requestAPI('resources', {}, settingsWith(fetch, 'secret-token'));
    const req = sent(fetch);
    expect(req.headers.get('Authorization')).toBe('token secret-token');
    expect(req.headers.get('X-XSRFToken')).toBe('xsrf-value');
    expect(req.headers.get('Content-Type')).toBe('application/json');
  });

  it('passes method and body through', async () => {
    const fetch = reply('{"id": "j1"}', 201, 'Created');
    const job = await requestAPI<{ id: string }>(
      'pipeline',
      { method: 'POST', body: JSON.stringify({ notebook: 'a.ipynb' }) },
      settingsWith(fetch)
    );
    const req = sent(fetch);
    expect(req.method).toBe('POST');
    expect(await req.json()).toEqual({ notebook: 'a.ipynb' });
    expect(job).toEqual({ id: 'j1' });
  });

  it('parses a JSON reply, keeps a non-JSON one as text and maps an empty one to null', async () => {
    expect(await requestAPI('x', {}, settingsWith(reply('{"a": [1, 2]}')))).toEqual({ a: [1, 2] });
    expect(await requestAPI('x', {}, settingsWith(reply('plain text')))).toBe('plain text');
    expect(await requestAPI('x', {}, settingsWith(reply('')))).toBeNull();
  });

  it("turns an error reply into an ApiError with the server's message, field and fix", async () => {
    const body = JSON.stringify({ error: 'lr must be > 0, got -1', field: 'lr', fix: 'pass -p lr 2e-4' });
    const err = await failure(requestAPI('pipeline', {}, settingsWith(reply(body, 400, 'Bad Request'))));
    expect(err).toBeInstanceOf(ApiError);
    expect(err).toMatchObject({ message: 'lr must be > 0, got -1', status: 400, field: 'lr', fix: 'pass -p lr 2e-4' });
    expect(err.full).toBe('lr must be > 0, got -1 Fix: pass -p lr 2e-4');
  });

  it('falls back to `message`, then to the HTTP status text', async () => {
    const withMessage = await failure(requestAPI('x', {}, settingsWith(reply('{"message": "Forbidden here"}', 403))));
    expect(withMessage).toMatchObject({ message: 'Forbidden here', status: 403, field: null, fix: null });
    expect(withMessage.full).toBe('Forbidden here');
    const html = await failure(requestAPI('x', {}, settingsWith(reply('<html>oops</html>', 502, 'Bad Gateway'))));
    expect(html).toBeInstanceOf(ApiError);
    expect(html).toMatchObject({ message: 'Bad Gateway', status: 502 });
  });

  it('rejects with NetworkError when the server cannot be reached', async () => {
    const fetch: FetchMock = jest.fn<Promise<Response>, [RequestInfo, RequestInit?]>(async () => {
      throw new TypeError('Failed to fetch');
    });
    await expect(requestAPI('runs', {}, settingsWith(fetch))).rejects.toBeInstanceOf(ServerConnection.NetworkError);
  });
});

describe('api', () => {
  it("uses the page's base URL by default and escapes ids in the path", async () => {
    PageConfig.setOption('baseUrl', '/jupyter/');
    const fetch = jest.spyOn(globalThis, 'fetch').mockImplementation(async () => new Response('{"id": "a/b c"}'));
    const run = await api.run('a/b c');
    expect(run).toEqual({ id: 'a/b c' });
    const url = new URL((fetch.mock.calls[0][0] as Request).url);
    expect(url.pathname).toBe('/jupyter/llmops/runs/a%2Fb%20c');
  });

  it('starts a pipeline with a JSON body', async () => {
    PageConfig.setOption('baseUrl', '/');
    const fetch = jest.spyOn(globalThis, 'fetch').mockImplementation(async () => new Response('{"id": "j1"}'));
    await api.startPipeline('nb.ipynb', { lr: 0.001 });
    const req = fetch.mock.calls[0][0] as Request;
    expect(new URL(req.url).pathname).toBe('/llmops/pipeline');
    expect(req.method).toBe('POST');
    expect(await req.json()).toEqual({ notebook: 'nb.ipynb', parameters: { lr: 0.001 } });
  });
});

describe('reply helpers', () => {
  it('parseBody', () => {
    expect(parseBody('')).toBeNull();
    expect(parseBody('[1]')).toEqual([1]);
    expect(parseBody('{bad')).toBe('{bad');
  });

  it('errorFromReply ignores a body that is not an object', () => {
    expect(errorFromReply(500, 'Internal Server Error', 'Traceback ...')).toMatchObject({
      message: 'Internal Server Error',
      status: 500
    });
    expect(errorFromReply(404, 'Not Found', null).message).toBe('Not Found');
  });
});
