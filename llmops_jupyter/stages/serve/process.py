"""Entry point of a detached deployment (``%llmops serve --detach``): loads the model and serves in the
foreground of its own process on the socket inherited from the kernel. The spec arrives in the
``LLMOPS_SERVE_SPEC`` environment variable and holds only key *hashes*, never a key."""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def main() -> int:
    from llmops_jupyter.models.refs import resolve_model
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.export.stage import resolve_gguf
    from llmops_jupyter.stages.serve import server
    from llmops_jupyter.stages.serve.app import Limits, ServeContext
    from llmops_jupyter.stages.serve.engine import make_engine
    from llmops_jupyter.stages.serve.reqlog import RequestLog

    spec = json.loads(os.environ.pop("LLMOPS_SERVE_SPEC"))
    registry = Registry.open()
    dep_id = spec["deployment"]
    sock = socket.socket(fileno=spec["fd"])
    try:
        # a gguf version is served by llama.cpp, anything else by transformers (the same choice as in the kernel)
        model = resolve_gguf(spec["model_path"], registry) or resolve_model(spec["model_path"], registry,
                                                                            register=False)
        engine = make_engine(model, registry=registry, device=spec.get("device"), max_batch=spec.get("max_batch", 8))
        from llmops_jupyter.stages.adapt.augment import RequestAdapter
        from llmops_jupyter.stages.monitor.otel import exporter_from_env

        adapter = RequestAdapter.from_refs(registry, spec.get("prompt"), spec.get("rag"), spec.get("rag_k", 3))
        if adapter is not None and spec.get("rag_index"):
            adapter.index_hash = spec["rag_index"]
        ctx = ServeContext(engine=engine, limits=Limits(**spec["limits"]), deployment=dep_id,
                           model_name=spec["model_name"], model_hash=spec["model_hash"],
                           key_hashes=spec["key_hashes"], log=RequestLog(registry, exporter=exporter_from_env()),
                           adapter=adapter)
    except BaseException as exc:
        server.record(registry, dep_id, status="failed", error=f"{type(exc).__name__}: {exc}",
                      stopped_at=time.time())
        raise
    server.record(registry, dep_id, status="running", pid=os.getpid())
    print(f"llmops: deployment {dep_id} serving {spec['url']}", flush=True)
    server.serve_foreground(ctx, sock, registry, grace=spec.get("grace", 30.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
