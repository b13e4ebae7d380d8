"""Optional export of request traces to an OpenTelemetry collector.

Enabled only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and the
OpenTelemetry SDK + OTLP exporter are installed; otherwise :func:`exporter_from_env` returns ``None`` and the
embedded SQLite log stays the only store. Spans carry the *scrubbed* record (GenAI semantic-convention names).
"""

from __future__ import annotations

import os
import sys
from typing import Any


class OtelExporter:
    def __init__(self, tracer: Any):
        self.tracer = tracer

    def export(self, rec: dict[str, Any]) -> None:
        start = int(float(rec["ts"]) * 1e9)
        end = start + int(float(rec.get("latency_s") or 0) * 1e9)
        span = self.tracer.start_span(f"llmops {rec.get('endpoint') or 'request'}", start_time=start)
        for key, value in {
            "llmops.deployment": rec.get("deployment"), "gen_ai.request.model": rec.get("model_name"),
            "llmops.model_artifact": rec.get("model"), "gen_ai.usage.input_tokens": rec.get("tokens_in"),
            "gen_ai.usage.output_tokens": rec.get("tokens_out"), "http.response.status_code": rec.get("status"),
            "gen_ai.response.finish_reasons": rec.get("finish_reason"), "llmops.key_id": rec.get("key_id"),
            "gen_ai.prompt": rec.get("prompt"), "gen_ai.completion": rec.get("response"),
            "llmops.checks": rec.get("checks"),
        }.items():
            if value is not None:
                span.set_attribute(key, value)
        span.end(end_time=end)


def exporter_from_env() -> OtelExporter | None:
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        print("llmops: OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-sdk / opentelemetry-exporter-otlp are "
              "not installed; traces stay in the registry only (pip install 'llmops-jupyter[otel]').",
              file=sys.stderr)
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                        "llmops-serve")}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return OtelExporter(provider.get_tracer("llmops_jupyter"))
