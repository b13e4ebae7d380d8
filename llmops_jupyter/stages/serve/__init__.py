"""OpenAI-compatible serving of any model version (see ``docs/serving.md``).

``engine`` (one worker thread owns the model), ``batching`` (continuous batching of its requests), ``app`` (FastAPI
routes, limits, auth), ``reqlog`` (PII-scrubbed request log, single writer), ``server`` (thread / foreground / detached process,
deployment status, graceful stop). Importing this package is light; FastAPI, uvicorn and torch load on use.
"""
