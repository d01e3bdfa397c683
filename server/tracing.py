"""Optional OpenTelemetry tracing of RPCs: ``metarec serve --tracing`` (off by default).

:class:`RpcTracer` opens one server span per call, named ``metarec.v1.RecommenderService/METHOD``,
as the child of the caller's span when the call's metadata carries one (W3C ``traceparent``),
with the attributes ``rpc.system``, ``rpc.service``, ``rpc.method`` and
``rpc.grpc.status_code``, and an error status for every code but ``OK``.

Spans go through the OpenTelemetry API (``pip install 'metarec[tracing]'``) to whatever tracer
provider the process has: configure the SDK and its exporter the standard OpenTelemetry way
(for example the ``OTEL_*`` environment variables read by the SDK's auto-configuration). With
no provider configured the API's spans cost next to nothing and go nowhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError("--tracing needs the OpenTelemetry API: pip install 'metarec[tracing]'") from error


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
