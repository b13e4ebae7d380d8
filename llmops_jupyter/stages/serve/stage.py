"""``%llmops serve``: an OpenAI-compatible endpoint for any model version, and ``%llmops deployments``.

The run records a ``deployment`` artifact (a JSON manifest: model artifact hash, url, start time, limits, key ids)
with lineage model → deployment; the registry's ``deployments`` table keeps its live status. Requests are logged,
PII-scrubbed, to the ``requests`` table for ``%llmops monitor``.

A generated API key is never printed: cell outputs are saved in the ``.ipynb`` (and in every pipeline notebook
papermill stores), so the key goes to a file only its owner can read, ``<registry home>/deployments/<id>/api_key``
(mode 0600, removed when the deployment stops), and the output shows that path and how to use it.
"""

from __future__ import annotations

import dataclasses
import html
import ipaddress
import json
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table, fmt_time
from llmops_jupyter.core.errors import ConfigError
from llmops_jupyter.core.stage import CommandEnv, Stage, command, register_stage

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass
class ServeConfig(StageConfig):
    model: str | None = option(None, "model to serve: a run id (merged/quantized/adapter/base), a checkpoint "
                                     "folder or a provider name such as tiny-llama")
    deployment: str | None = option(None, "with --stop: the deployment id to stop (default: every running one "
                                          "this kernel can stop)", positional=True)
    stop: bool = option(False, "stop a deployment gracefully (in-flight requests finish first)")
    host: str = option("127.0.0.1", "interface to listen on; loopback by default, 0.0.0.0 exposes it")
    port: int = option(0, "TCP port (0 = any free port)", min=0, max=65535)
    api_key_env: str | None = option(None, "environment variable holding the API key(s) (comma-separated); "
                                           "without it a key is generated into a 0600 file in the registry "
                                           "(the output shows its path, never the key)")
    auth: bool = option(True, "require an API key (--no-auth is allowed on loopback only)")
    max_request_bytes: int = option(1 << 20, "largest accepted request body; larger ones get 413", min=256)
    max_tokens: int = option(512, "largest max_tokens a request may ask for; more gets 400", min=1)
    default_max_tokens: int = option(128, "max_tokens when a request does not say (capped at --max-tokens)", min=1)
    max_prompt_tokens: int | None = option(None, "longest accepted prompt in tokens (default: context length "
                                                 "minus max_tokens)", min=1)
    max_concurrency: int = option(32, "requests generating or streaming at once (at least --max-batch, or batches "
                                      "never fill; the rest wait for a slot)", min=1, max=1024)
    queue_timeout: float = option(10.0, "seconds a request waits for a free slot before a 429", min=0)
    max_batch: int = option(32, "continuous batching: most requests decoding together (they join between steps "
                                "and leave when done; 1 = one at a time)", min=1, max=256)
    grace: float = option(30.0, "seconds in-flight requests get to finish on stop", min=0)
    prompt: str | None = option(None, "versioned prompt name@version applied to every chat request (its system "
                                      "part replaces the client's system message; a user part whose variables are "
                                      "question/context wraps the user message)")
    rag: str | None = option(None, "vector index (index run, hash or folder): retrieve context for every chat "
                                   "request and put it into the prompt; monitoring checks answers against it")
    rag_k: int = option(3, "chunks retrieved per request with --rag", min=1, max=100)
    device: str | None = option(None, "cpu, cuda, cuda:1 (default: cuda when available)")
    detach: bool = option(False, "serve from a separate process that outlives the kernel")
    foreground: bool | None = option(None, "block until stopped (Ctrl-C); default: yes outside notebooks "
                                           "(the `llmops serve` CLI), no in a kernel")

    def validate(self) -> None:
        if self.stop:
            return
        if not self.model:
            raise self.invalid("model", "is required to start a deployment",
                               fix="pass --model <run|folder|provider>, or --stop to stop one")
        if self.deployment:
            raise self.invalid("deployment", "is only used with --stop", fix="leave it out, or add --stop")
        if not self.auth and not _is_loopback(self.host):
            raise self.invalid("auth", "may only be disabled on a loopback host",
                               fix="keep auth on (default) or use --host 127.0.0.1")
        if self.detach and self.foreground:
            raise self.invalid("foreground", "cannot be combined with --detach")


class DeploymentInfo:
    """What `%llmops serve` shows: where the endpoint is and where its generated key is kept (never the key:
    cell outputs are saved with the notebook)."""

    def __init__(self, info: dict[str, Any], api_key_file: str | os.PathLike[str] | None = None):
        self.info = info
        self.api_key_file = Path(api_key_file) if api_key_file is not None else None

    @property
    def api_key(self) -> str | None:
        """The generated key, read from :attr:`api_key_file` (``None`` with ``--api-key-env`` or ``--no-auth``)."""
        return self.api_key_file.read_text().strip() if self.api_key_file is not None else None

    def _usage(self) -> list[tuple[str, str]]:
        """How to use the key without ever pasting it: the client reads the file."""
        if self.api_key_file is None:
            return []
        path = str(self.api_key_file)
        return [("python", f"OpenAI(base_url={self.info['url']!r}, api_key=open({path!r}).read())"),
                ("shell", f"export OPENAI_API_KEY=$(cat {shlex.quote(path)})")]

    def _rows(self) -> list[tuple[str, str]]:
        i = self.info
        rows = [("deployment", i["deployment"]), ("url", i["url"]), ("model", f"{i['model']['name']} "
                f"({i['model']['kind']} {str(i['model']['hash'])[:12]})"), ("mode", i["mode"])]
        if self.api_key_file is not None:
            rows.append(("api key", f"in {self.api_key_file} (generated, readable by you only; not shown)"))
        elif i.get("auth", True):
            rows.append(("api key", "the key(s) in the variable given with --api-key-env"))
        return rows + self._usage() + [("stop", f"%llmops serve --stop {i['deployment']}")]

    def __str__(self) -> str:
        return "\n".join(f"{k:<11} {v}" for k, v in self._rows())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(v)}</code></td></tr>"
                       for k, v in self._rows())
        return f"<div class='llmops-deployment'><b>Serving</b><table>{rows}</table></div>"


def _keys(cfg: ServeConfig) -> tuple[list[str], str | None]:
    """(key hashes, generated key or None)."""
    from llmops_jupyter.stages.serve.app import hash_key

    if not cfg.auth:
        return [], None
    if cfg.api_key_env:
        raw = os.environ.get(cfg.api_key_env, "")
        keys = [k.strip() for k in raw.split(",") if k.strip()]
        if not keys:
            raise ConfigError(f"serve: --api-key-env {cfg.api_key_env}: that environment variable is empty or unset.",
                              field="api_key_env", value=cfg.api_key_env,
                              fix=f"export {cfg.api_key_env}=<key> before starting the kernel, or drop the flag "
                                  "to get a generated key")
        return [hash_key(k) for k in keys], None
    key = "sk-llmops-" + secrets.token_urlsafe(24)
    return [hash_key(key)], key


@register_stage
class ServeStage(Stage):
    """Serve a model version over an OpenAI-compatible HTTP API (chat/completions, streaming); --stop stops it."""

    name = "serve"
    extras = ("serve",)  # includes [finetune]: the model runtime
    config_cls = ServeConfig

    def run(self, ctx) -> dict[str, Any]:
        from llmops_jupyter.stages.serve import server

        cfg: ServeConfig = ctx.config
        reg = ctx.registry
        if cfg.stop:
            ids = server.stop(reg, cfg.deployment, timeout=cfg.grace + 30)
            ctx.set_summary(stopped=ids)
            rows = [[r["id"], r["status"], r["url"], fmt_time(r["stopped_at"])]
                    for r in server.list_deployments(reg) if r["id"] in ids]
            return {"stopped": Table(["deployment", "status", "url", "stopped"], rows, title="Stopped")}

        from llmops_jupyter.models.refs import use_model
        from llmops_jupyter.stages.export.stage import resolve_gguf
        from llmops_jupyter.stages.serve.app import Limits, ServeContext, key_id

        m = resolve_gguf(cfg.model, reg)  # a GGUF version is served by llama.cpp behind the same app
        if m is not None:
            from llmops_jupyter.core.extras import check

            check(["gguf"], feature="%llmops serve of a GGUF model")
            ctx.use(m.artifact)
        else:
            m = use_model(ctx, cfg.model)
        from llmops_jupyter.stages.adapt.augment import RequestAdapter

        adapter = RequestAdapter.from_refs(reg, cfg.prompt, cfg.rag, cfg.rag_k)  # fails before the port is bound
        if adapter is not None:  # lineage: prompt / index → deployment
            if adapter.template is not None:
                ctx.use(adapter.template.hash)
            if adapter.index is not None and adapter.index.artifact is not None:
                ctx.use(adapter.index.artifact)
        key_hashes, generated = _keys(cfg)
        limits = Limits(max_request_bytes=cfg.max_request_bytes, max_tokens=cfg.max_tokens,
                        default_max_tokens=cfg.default_max_tokens, max_prompt_tokens=cfg.max_prompt_tokens,
                        max_concurrency=cfg.max_concurrency, queue_timeout=cfg.queue_timeout)
        foreground = cfg.foreground if cfg.foreground is not None else (not cfg.detach and not _in_kernel())
        mode = "process" if cfg.detach else ("foreground" if foreground else "thread")
        sock = server.bind(cfg.host, cfg.port)
        port = sock.getsockname()[1]
        url = server.url_for(cfg.host, port)
        dep_id = ctx.run_id
        key_file = server.api_key_path(reg.home, dep_id) if generated else None
        model_hash = m.artifact.hash if m.artifact else None
        manifest = {"deployment": dep_id, "url": url, "host": cfg.host, "port": port, "mode": mode,
                    "started": time.time(), "limits": limits.to_dict(), "key_ids": [key_id(h) for h in key_hashes],
                    "auth": cfg.auth, "api_key_file": str(key_file) if key_file else None,
                    "model": {"hash": model_hash, "kind": m.kind, "name": m.name, "path": str(m.path)},
                    "openai_base_url": url, "batching": _batching(m, cfg.max_batch, cfg.max_concurrency),
                    "prompt": adapter.template.ref if adapter and adapter.template else None,
                    "rag": {"index": adapter.index_hash, "k": cfg.rag_k} if adapter and adapter.index else None}
        server.record(reg, dep_id, run_id=ctx.run_id, model=model_hash, model_name=m.name, url=url, mode=mode,
                      pid=os.getpid(), host=os.uname().nodename, status="starting", started_at=manifest["started"],
                      key_ids=manifest["key_ids"], limits=manifest["limits"])
        try:
            if generated:
                server.write_api_key(reg.home, dep_id, generated)
                generated = None  # from here on the key exists only in its file (and as a hash in the server)
            if mode == "process":
                spec = {"deployment": dep_id, "model_path": model_hash or str(m.path), "model_name": m.name,
                        "model_hash": model_hash, "limits": limits.to_dict(), "key_hashes": key_hashes,
                        "url": url, "grace": cfg.grace, "device": cfg.device, "max_batch": cfg.max_batch,
                        "prompt": adapter.template.ref if adapter and adapter.template else None,
                        "rag": str(adapter.index.path) if adapter and adapter.index else None,
                        "rag_index": adapter.index_hash if adapter else None, "rag_k": cfg.rag_k}
                ctx.log(f"starting detached server for {m.name} on {url}")
                server.spawn_process(spec, sock, reg)
                serve_ctx = None
            else:
                from llmops_jupyter.stages.monitor.otel import exporter_from_env
                from llmops_jupyter.stages.serve.engine import make_engine
                from llmops_jupyter.stages.serve.reqlog import RequestLog

                ctx.progress(0, 1, "loading model")
                engine = make_engine(m, registry=reg, device=cfg.device, max_batch=cfg.max_batch)
                ctx.progress(1, 1, "loading model")
                serve_ctx = ServeContext(engine=engine, limits=limits, deployment=dep_id, model_name=m.name,
                                         model_hash=model_hash, key_hashes=key_hashes,
                                         log=RequestLog(reg, exporter=exporter_from_env()), adapter=adapter)
        except BaseException as exc:
            sock.close()
            if key_file is not None:
                key_file.unlink(missing_ok=True)
            server.record(reg, dep_id, status="failed", stopped_at=time.time(), error=f"{type(exc).__name__}: {exc}")
            raise
        folder = ctx.staging_dir("deployment")
        (folder / "deployment.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        art = ctx.save_artifact(folder, "deployment", name=f"{m.name}@{url}", meta={"url": url, "mode": mode})
        server.record(reg, dep_id, artifact=art.hash)
        ctx.set_summary(deployment=dep_id, url=url, model=model_hash, mode=mode)
        info = DeploymentInfo({**manifest, "artifact": art.hash}, key_file)
        if mode == "thread":
            dep = server.start_thread(serve_ctx, sock, reg, url, grace=cfg.grace)
            server.record(reg, dep_id, status="running")
            return {"deployment": info, "handle": dep}
        if mode == "foreground":
            server.record(reg, dep_id, status="running")
            print(str(info), flush=True)
            print("Serving in the foreground; Ctrl-C stops gracefully.", flush=True)
            server.serve_foreground(serve_ctx, sock, reg, grace=cfg.grace)
            return {"deployment": info}
        return {"deployment": info}


def _batching(model: Any, max_batch: int, max_concurrency: int) -> dict[str, Any]:
    """What the deployment really does with concurrent requests (llama.cpp's engine generates one at a time; a
    batch never holds more requests than may run at once)."""
    if getattr(model, "kind", None) == "gguf":
        return {"max_batch": 1, "engine": "llama.cpp", "note": "one request at a time; --max-batch applies to "
                                                                "transformers models"}
    out: dict[str, Any] = {"max_batch": max_batch, "engine": "transformers",
                           "effective_max_batch": min(max_batch, max_concurrency)}
    if max_concurrency < max_batch:
        out["note"] = f"--max-concurrency {max_concurrency} caps batches below --max-batch {max_batch}"
    return out


def _in_kernel() -> bool:
    ip = sys.modules.get("IPython")
    if ip is None:
        return False
    try:
        return ip.get_ipython() is not None
    except Exception:  # noqa: BLE001
        return False


@dataclasses.dataclass
class DeploymentsConfig(StageConfig):
    status: str | None = option(None, "only deployments with this status",
                                choices=["starting", "running", "stopping", "stopped", "failed", "lost"])


@command("deployments", DeploymentsConfig)
def deployments(cfg: DeploymentsConfig, env: CommandEnv) -> Table:
    """List deployments (running, stopped, lost) with their url, model and request counts."""
    from llmops_jupyter.stages.serve.server import list_deployments

    rows = []
    counts = env.registry.request_counts()
    for r in list_deployments(env.registry, status=cfg.status):
        rows.append([r["id"], r["status"], r["mode"], r["url"], r["model_name"], str(r["model"] or "")[:12],
                     fmt_time(r["started_at"]), counts.get(r["id"], 0)])
    return Table(["deployment", "status", "mode", "url", "model", "artifact", "started", "requests"], rows,
                 title="Deployments")
