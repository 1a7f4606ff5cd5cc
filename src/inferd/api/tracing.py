"""Optional OpenTelemetry tracing (the ``otel`` extra): a span per HTTP request, sent over OTLP/HTTP."""

from __future__ import annotations

from fastapi import FastAPI


def install_tracing(app: FastAPI, endpoint: str):
    """Instrument ``app``; returns the tracer provider (shut it down to flush spans)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ValueError(
            f"--otlp-endpoint needs the OpenTelemetry packages: pip install 'inferd[otel]' ({exc})"
        ) from None
    provider = TracerProvider(resource=Resource.create({"service.name": "inferd"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls="health,ready,metrics")
    return provider
