"""Assembly of the metarec gRPC server (``grpc.aio``).

:class:`MetarecServer` wires together the model registries (hot reload), the micro-batcher,
the adapted-user cache, the interaction log, the ``RecommenderService``, the standard
``grpc.health.v1`` service, server reflection, optional TLS and bearer-token auth, message-size
and concurrency limits, and a graceful shutdown that finishes in-flight requests.

Secure defaults: it binds ``127.0.0.1`` (reachable from this machine only) unless told
otherwise, and models are loaded in Keras safe mode. Put TLS in front of the token whenever
the port is reachable from other machines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from metarec.backend_choice import configured_backend
from metarec.interaction_log import open_interaction_log
from metarec_server.auth import BearerTokenInterceptor
from metarec_server.batcher import BatcherConfig
from metarec_server.cache import AdaptedUserCache
from metarec_server.inference import check_support_sizes, load_serving_model, make_check, make_warm
from metarec_server.metrics import MetricsEndpoint, ServerMetrics, start_metrics_endpoint
from metarec_server.registry import ModelRegistry
from metarec_server.service import SERVICE_NAME, RecommenderService, add_service
from metarec_server.validation import Limits

log = logging.getLogger(__name__)

#: How often the health status is refreshed from the registries.
HEALTH_REFRESH_S = 0.2


@dataclasses.dataclass
class ServerConfig:
    """Everything ``metarec serve`` can set.

    Args:
        model_dir: folder of numbered versions (``DIR/1/model.keras``, ``DIR/2/...``).
        model_name: the name requests use for it (an empty name means this default model).
        extra_models: more models to serve, name → folder.
        host, port: where to listen; ``port=0`` picks a free port (see ``MetarecServer.port``).
        reuse_port: share the port with other processes that set it too (``SO_REUSEPORT``;
            the kernel spreads new connections across them). Off by default, so that a
            second server started by mistake on a busy port fails instead of silently
            taking part of its traffic. ``metarec serve --workers N`` sets it.
        log_path: the interaction log: a SQLite file (the embedded default), or a
            ``postgresql://`` URL for a log that several servers share.
        tls_cert_file, tls_key_file: PEM files; both or neither.
        auth_token: when set, every call except health checks needs
            ``authorization: Bearer <token>`` metadata.
        max_message_bytes: largest request or response accepted (gRPC answers
            ``RESOURCE_EXHAUSTED`` beyond it).
        max_concurrent_rpcs: calls in progress at once before gRPC answers
            ``RESOURCE_EXHAUSTED``; ``None`` for no limit.
        batching: micro-batching limits.
        cache_entries: adapted users kept (0 disables the cache).
        poll_interval_s: how often the model folders are checked for new versions.
        grace_s: how long shutdown waits for in-flight calls.
        limits: per-request limits.
        compile_cache: a folder that keeps compiled programs across restarts (JAX's
            persistent compilation cache; TensorFlow has none), or ``None``.
        metrics_port: serve Prometheus metrics at ``http://host:metrics_port/metrics``
            (``0`` picks a free port, see ``MetarecServer.metrics_port``); ``None``: no
            endpoint (the metrics are still counted, e.g. for a supervisor to serve).
        tracing: trace every call with OpenTelemetry (``metarec_server.tracing``; needs
            ``pip install 'metarec[tracing]'``).
        serve_after_warm_up: become SERVING only once the first version has compiled every
            served shape (by default it serves after its check and compiles the rest in the
            background): slower to SERVING, and no call meets a machine still compiling. For
            replicas behind a load balancer that routes by health.
        loader, check: how a version is loaded and verified (defaults: ``metarec.load`` in
            safe mode, and a test prediction that also compiles the kernels of one-user
            batches; the larger batch sizes compile after it, see ``inference.make_warm``).

    Raises:
        ValueError: on construction, for a value out of range; the message names the field
            and quotes the value received.
    """

    model_dir: str | Path
    model_name: str = "default"
    extra_models: Mapping[str, str | Path] = dataclasses.field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8500
    reuse_port: bool = False
    log_path: str | Path = "metarec-interactions.sqlite"
    tls_cert_file: str | Path | None = None
    tls_key_file: str | Path | None = None
    auth_token: str | None = None
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_rpcs: int | None = 4096
    batching: BatcherConfig = dataclasses.field(default_factory=BatcherConfig)
    cache_entries: int = 10_000
    poll_interval_s: float = 5.0
    grace_s: float = 10.0
    limits: Limits = dataclasses.field(default_factory=Limits)
    metrics_port: int | None = None
    tracing: bool = False
    loader: Callable[[Path], Any] = load_serving_model
    compile_cache: str | Path | None = None
    serve_after_warm_up: bool = False
    check: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both a certificate file and a key file")
        if self.model_name in self.extra_models:
            raise ValueError(f"model name {self.model_name!r} is given twice")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes!r}")
        for name in self.extra_models:
            if not isinstance(name, str) or not name:
                raise ValueError(f"extra model names must be non-empty strings, got {name!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be None or in 0..65535, got {self.metrics_port!r}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be None or >= 1, got {self.max_concurrent_rpcs!r}")
        if self.cache_entries < 0:
            raise ValueError(f"cache_entries must be >= 0, got {self.cache_entries!r}")
        # Written as "not >" so that NaN is refused too.
        if not self.poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0, got {self.poll_interval_s!r}")
        if not self.grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s!r}")


def _with_compilation_cache(loader: Callable[[Path], Any], folder: Path) -> Callable[[Path], Any]:
    """``loader``, enabling the backend's persistent compilation cache in ``folder`` once,
    before the first model loads (every registry shares it)."""
    once = threading.Lock()
    enabled = []

    def load(version_dir: Path) -> Any:
        with once:
            if not enabled:
                from metarec import backend  # imported here: Keras takes seconds to import

                if backend.enable_compilation_cache(folder):
                    log.info("compiled programs are kept in %s", folder)
                else:
                    log.warning("--compile-cache: the %s backend keeps no compiled programs across "
                                "processes; ignored", backend.BACKEND)
                enabled.append(True)
        return loader(version_dir)

    return load


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetarecServer:
    """A configured server; ``await start()``, then ``await stop()`` (or ``serve()``)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.cache = AdaptedUserCache(config.cache_entries, on_lookup=self.metrics.observe_cache_lookup)
        loader = config.loader
        if config.compile_cache is not None:
            # Enabled on the watcher thread just before the first load: importing Keras takes
            # seconds, and the port is bound (and health answers) before that.
            loader = _with_compilation_cache(loader, Path(config.compile_cache))
        check, warm = config.check, None
        if check is None:
            # The server runs on a fixed set of shapes: batch sizes in powers of two up to the
            # largest batch x supports padded to 16, 32 or 64 interactions (few shapes, so the
            # warm-up is short; past 16 interactions a support pads by less than 2x). A version
            # serves once the one-user calls of inference.check_support_sizes are compiled (the
            # backend decides which); the other shapes compile after that, in the background
            # for the first version (inference.make_warm, inference.WarmShapes).
            sizes, size = [], 1
            while size < config.batching.max_batch_size:
                sizes.append(size)
                size *= 2
            sizes.append(size)
            backend, _ = configured_backend()
            check = make_check(batch_sizes=(1,), support_sizes=check_support_sizes(backend),
                               warm_up_follows=True)
            warm = make_warm(batch_sizes=sizes, support_sizes=(16, 32, 64))
        folders = {config.model_name: Path(config.model_dir), **{n: Path(p) for n, p in config.extra_models.items()}}
        self.registries = {
            name: ModelRegistry(
                name,
                folder,
                loader=loader,
                check=check,
                warm=warm,
                poll_interval_s=config.poll_interval_s,
                on_swap=self._swapped,
                on_refuse=lambda refusal, name=name: self.metrics.version_refused(name, refusal.version),
                warm_first_before_serving=config.serve_after_warm_up,
            )
            for name, folder in folders.items()
        }
        tracer = None
        if config.tracing:
            from metarec_server.tracing import RpcTracer, ensure_tracer_provider  # an optional extra

            log.info("tracing: one span per call, sent to %s", ensure_tracer_provider())
            tracer = RpcTracer(SERVICE_NAME)
        self.interaction_log = open_interaction_log(config.log_path)
        self.service = RecommenderService(
            self.registries,
            config.model_name,
            self.interaction_log,
            cache=self.cache,
            batching=config.batching,
            limits=config.limits,
            metrics=self.metrics,
            tracer=tracer,
        )
        self.health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._health_task: asyncio.Task | None = None
        self.port: int | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._stopped = False

    def _swapped(self, served) -> None:
        self.cache.drop_model(served.name, served.version)
        self.metrics.model_swapped(served.name, served.version)

    @property
    def metrics_port(self) -> int | None:
        """The port of ``/metrics`` once started (``None`` without an endpoint)."""
        return self._metrics_endpoint.port if self._metrics_endpoint is not None else None
    # ------------------------------------------------------------------ start
    async def start(self) -> int:
        """Bind, start serving and start the model watchers; returns the bound port.

        Requests get ``UNAVAILABLE`` (and health ``NOT_SERVING``) until the default model's
        first version is loaded: see :meth:`wait_until_serving`.
        """
        config = self.config
        interceptors = [BearerTokenInterceptor(config.auth_token)] if config.auth_token else []
        server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                # gRPC's default is 1: then a second server on the same port would silently
                # share it. Only worker pools (``reuse_port``) share a port on purpose.
                ("grpc.so_reuseport", int(config.reuse_port)),
            ],
        )
        add_service(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
        address = _address(config.host, config.port)
        if config.tls_cert_file is not None:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())]
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if not port:
            raise RuntimeError(f"could not bind {address}")
        if config.metrics_port is not None:
            self._metrics_endpoint = start_metrics_endpoint(config.host, config.metrics_port, self.metrics.registry)
            log.info("metrics at http://%s/metrics", _address(config.host, self._metrics_endpoint.port))
        await self._refresh_health()
        await server.start()
        self._server = server
        self.port = port
        for registry in self.registries.values():
            registry.start()
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop(), name="metarec-health")
        log.info(
            "metarec server listening on %s (%s%s)",
            _address(config.host, port),
            "TLS" if config.tls_cert_file else "plaintext",
            ", token auth" if config.auth_token else "",
        )
        return port

    async def wait_until_serving(self, timeout: float | None = None) -> bool:
        """Wait for the default model's first scan; ``True`` when a version then serves."""
        registry = self.registries[self.config.model_name]

        async def wait() -> bool:
            while not registry.has_polled:
                await asyncio.sleep(0.02)
            return registry.current is not None

        return await asyncio.wait_for(wait(), timeout)

    # ------------------------------------------------------------------ health
    def _serving(self) -> bool:
        return not self.service.draining and self.registries[self.config.model_name].current is not None

    async def _refresh_health(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if self._serving() else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def _health_loop(self) -> None:
        # Swaps happen on the watcher threads; polling here keeps health updates on the loop.
        while not self._stopped:
            await self._refresh_health()
            await asyncio.sleep(HEALTH_REFRESH_S)

    # ------------------------------------------------------------------ stop
    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: refuse new calls, finish in-flight ones (up to ``grace``
        seconds), then stop the batcher, the watchers and the log. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        self.service.draining = True
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await self.service.aclose()
        for registry in self.registries.values():
            # A load in progress is left to finish (up to a minute): a thread still inside
            # Keras when the interpreter exits can abort the process.
            registry.stop(timeout=max(grace, 60.0))
        self.interaction_log.close()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        log.info("metarec server stopped")

    async def serve(self, ready: Callable[[int], None] | None = None) -> None:
        """Start, call ``ready(port)``, run until SIGINT / SIGTERM, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            port = await self.start()
            if ready is not None:
                ready(port)
            await stop.wait()
            log.info("signal received: draining (grace %.1f s)", self.config.grace_s)
        finally:
            await self.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
