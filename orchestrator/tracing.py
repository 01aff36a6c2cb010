"""Traces across the hops of an execution (OpenTelemetry, W3C `traceparent` in AMQP headers).

One trace per execution: the flow-start request (or the cron fire) begins it; the scheduler's
admission, the engine's transitions, the dispatcher's release, the worker's step and every
status event carry it on. The mechanism sits where every message passes, not in each
service:

* publishing (`orchestrator.amqp`): a message is sent with the `traceparent` of the span that
  is current when it is rendered (`current_traceparent`); the engine's outbox keeps it with
  the rendered message, so a flush after a crash still continues the trace;
* consuming (`orchestrator.consumer.Consumer`): each delivery is handled inside a span whose
  parent is the delivery's `traceparent` (`consume_span`);
* the engine keeps an execution's `traceparent` with its state, so transitions that no message
  starts (timers) continue the same trace.

Off unless configured (`ORCH_TRACES`: `none`, `console`, `otlp`; OTLP over HTTP honours the
standard `OTEL_EXPORTER_OTLP_*` variables). Off, every call here is a cheap no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

HEADER = "traceparent"
_PROPAGATOR = TraceContextTextMapPropagator()


class _State:
    tracer: trace.Tracer | None = None
    provider: TracerProvider | None = None


_state = _State()


def configure(service: str, exporter: str | SpanExporter = "none") -> None:
    """Turns tracing on for this process with a span exporter: `console`, `otlp`, or an
    exporter object (tests pass an in-memory one); `none` turns it off."""
    if _state.provider is not None:
        _state.provider.shutdown()
    if exporter == "none":
        _state.tracer = _state.provider = None
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif isinstance(exporter, SpanExporter):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        raise ValueError(f"unknown trace exporter {exporter!r}: none, console or otlp")
    _state.provider = provider
    _state.tracer = provider.get_tracer("orchestrator")


def enabled() -> bool:
    return _state.tracer is not None


def shutdown() -> None:
    """Flushes what is buffered (at process exit)."""
    if _state.provider is not None:
        _state.provider.shutdown()


def _context(traceparent: str | None) -> Context | None:
    if not traceparent:
        return None
    return _PROPAGATOR.extract({HEADER: traceparent})


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """A span around the block, child of `parent` (a traceparent) if given, else of the
    current span; nothing at all when tracing is off."""
    if _state.tracer is None:
        yield
        return
    clean = {k: v for k, v in (attributes or {}).items() if v is not None}
    with _state.tracer.start_as_current_span(
        name, context=_context(parent), kind=kind, attributes=clean
    ):
        yield


@contextlib.contextmanager
def consume_span(queue: str, headers: Mapping[str, Any] | None) -> Iterator[None]:
    """The span of one delivery, continuing the trace its `traceparent` header names."""
    if _state.tracer is None:
        yield
        return
    try:  # whatever a sender put in its headers: a bad value only starts a new trace
        raw = headers.get(HEADER) if isinstance(headers, Mapping) else None
        parent = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    except Exception:
        parent = None
    with span(
        f"{queue} process",
        parent=parent if isinstance(parent, str) else None,
        kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "rabbitmq", "messaging.destination.name": queue},
    ):
        yield


def current_traceparent() -> str:
    """The W3C traceparent of the current span; '' when there is none (or tracing is off)."""
    if _state.tracer is None:
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(HEADER, "")
