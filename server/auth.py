"""Bearer-token authentication for the gRPC server.

Clients send ``authorization: Bearer <token>`` metadata; anything else gets
``UNAUTHENTICATED`` before the handler runs. The comparison is constant-time so response
timing does not leak the token. Health checks are exempt by default so load balancers and
orchestrators can probe without the secret (they learn nothing but "serving or not").

A bearer token is only secret on an encrypted channel: enable TLS when the server is reachable
from other machines.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right ``authorization`` metadata.

    Args:
        token: the shared secret (non-empty).
        exempt_prefixes: method paths starting with one of these need no token.
    """

    def __init__(self, token: str, exempt_prefixes: Iterable[str] = (HEALTH_PREFIX,)) -> None:
        if not token:
            raise ValueError("the auth token must be non-empty")
        self._expected = f"Bearer {token}".encode()
        self._exempt = tuple(exempt_prefixes)

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._exempt):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        return _denying_handler(handler)


async def _deny(request_or_iterator, context: grpc.aio.ServicerContext):
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED, "missing or invalid 'authorization: Bearer <token>' metadata"
    )


def _denying_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that aborts with UNAUTHENTICATED."""
    kwargs = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(_deny, **kwargs)
