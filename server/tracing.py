"""Optional OpenTelemetry tracing of RPCs: ``metarec serve --tracing`` (off by default).

:class:`RpcTracer` opens one server span per call, named ``metarec.v1.RecommenderService/METHOD``,
as the child of the caller's span when the call's metadata carries one (W3C ``traceparent``),
with the attributes ``rpc.system``, ``rpc.service``, ``rpc.method`` and
``rpc.grpc.status_code``, and an error status for every code but ``OK``.

Spans go through the OpenTelemetry API to the process's tracer provider. When the process has
none (it was not started under ``opentelemetry-instrument``, and nothing set one),
:func:`ensure_tracer_provider` sets up the OpenTelemetry SDK from the standard environment
variables: ``OTEL_TRACES_EXPORTER`` (default ``otlp``: OTLP over HTTP to
``OTEL_EXPORTER_OTLP_ENDPOINT``, default ``http://localhost:4318``; ``console`` prints spans;
several names may be given, comma-separated), ``OTEL_SERVICE_NAME`` (default ``metarec``) and
``OTEL_RESOURCE_ATTRIBUTES``. ``pip install 'metarec[tracing]'`` installs the API, the SDK and
the OTLP/HTTP exporter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points
from typing import Any

import grpc

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError("--tracing needs the OpenTelemetry API: pip install 'metarec[tracing]'") from error


#: ``OTEL_TRACES_EXPORTER=otlp`` per ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL``: the exporters'
#: own entry-point names (group ``opentelemetry_traces_exporter``).
OTLP_EXPORTERS = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}


def ensure_tracer_provider() -> str:
    """Give the process an OpenTelemetry SDK tracer provider if it has none yet; returns
    where spans go, for the server's log.

    A provider already set (by ``opentelemetry-instrument``, or by the embedding program) is
    kept. Otherwise the SDK's ``TracerProvider`` exports through a batch processor to each
    exporter ``OTEL_TRACES_EXPORTER`` names (module docstring).

    Raises:
        ValueError: an exporter named there is not installed (the message says which
            package provides it), or the OTLP protocol is not one of :data:`OTLP_EXPORTERS`.
    """
    current = trace.get_tracer_provider()
    if not isinstance(current, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return f"the process's tracer provider ({type(current).__name__})"
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return ("nowhere: the OpenTelemetry SDK is not installed (pip install 'metarec[tracing]'), "
                "and the process configured no tracer provider")
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    if not names:
        return "nowhere: OTEL_TRACES_EXPORTER=none"
    available = {ep.name: ep for ep in entry_points(group="opentelemetry_traces_exporter")}
    exporters = []
    for name in names:
        entry = name
        if name == "otlp":
            protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
            if protocol not in OTLP_EXPORTERS:
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be one of {sorted(OTLP_EXPORTERS)}; "
                                 f"got {protocol!r}.")
            entry = OTLP_EXPORTERS[protocol]
        if entry not in available:
            package = "opentelemetry-exporter-" + entry.replace("_", "-")
            raise ValueError(
                f"OTEL_TRACES_EXPORTER names {name!r}, but no installed package provides the "
                f"{entry!r} span exporter (installed: {sorted(available) or 'none'}). Install "
                f"{package} (pip install 'metarec[tracing]' has OTLP over HTTP), or set "
                "OTEL_TRACES_EXPORTER=console.")
        exporters.append((name, available[entry].load()()))
    provider = TracerProvider(resource=Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", "metarec")}))
    for _, exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return "the OpenTelemetry SDK, exporting to " + ", ".join(
        _destination(name, exporter) for name, exporter in exporters)


def _destination(name: str, exporter: Any) -> str:
    """``otlp (http://localhost:4318/v1/traces)``, ``console (stdout)``, or the name alone."""
    where = "stdout" if name == "console" else getattr(exporter, "_endpoint", None)  # OTLP keeps its URL there
    return f"{name} ({where})" if where else name


class RpcOutcome:
    """What the handler reports to its span: the status code it answered."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.CANCELLED  # unless an answer is reached


class RpcTracer:
    """Server spans around RPC handlers.

    Args:
        service: the full gRPC service name (``metarec.v1.RecommenderService``).
        tracer_provider: where spans go (default: the process's global provider).
    """

    def __init__(self, service: str, tracer_provider: Any = None) -> None:
        self.service = service
        self._tracer = trace.get_tracer("metarec_server", tracer_provider=tracer_provider)

    @contextlib.contextmanager
    def rpc(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> Iterator[RpcOutcome]:
        """A span for one call of ``method``; set ``outcome.code`` before leaving.

        Args:
            method: the RPC's name (``Recommend``).
            metadata: the call's invocation metadata (the caller's trace context).

        Returns:
            A context manager yielding the :class:`RpcOutcome` to fill in.
        """
        carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
        parent = propagate.extract(carrier)
        attributes = {"rpc.system": "grpc", "rpc.service": self.service, "rpc.method": method}
        with self._tracer.start_as_current_span(
            f"{self.service}/{method}", context=parent, kind=SpanKind.SERVER, attributes=attributes,
            record_exception=False, set_status_on_exception=False,
        ) as span:
            outcome = RpcOutcome()
            try:
                yield outcome
            finally:
                span.set_attribute("rpc.grpc.status_code", outcome.code.value[0])
                if outcome.code is not grpc.StatusCode.OK:
                    span.set_status(Status(StatusCode.ERROR, outcome.code.name))
