"""Prometheus metrics of the server: ``metarec serve --metrics-port N``.

:class:`ServerMetrics` holds the collectors of one server and the methods its parts call
(every one cheap and thread-safe); :func:`start_metrics_endpoint` serves them over HTTP at
``/metrics`` in the Prometheus text format.

==================================================  =========================================================
``metarec_requests_total{method,code}``             calls answered, per RPC and gRPC status code
``metarec_request_duration_seconds{method,code}``   histogram of the time from handler start to answer
``metarec_batch_size``                              histogram of requests per model call (micro-batch)
``metarec_batch_queue_seconds``                     histogram of the time a request waited for its batch
``metarec_adapted_user_cache_lookups_total{result}``  adapted-user cache lookups: ``hit`` or ``miss``
                                                    (hit rate = hits / (hits + misses))
``metarec_model_version{model}``                    the version each model serves (absent while none)
``metarec_model_version_refusals_total{model,version}``  versions refused (failed to load or check)
``metarec_interaction_log_rows_written_total``      rows committed to the interaction log
``metarec_interaction_log_replays_total``           LogInteractions calls whose request id had been
                                                    committed before (nothing stored)
==================================================  =========================================================

Several workers (``--workers N``): each worker writes its values to files in a folder the
supervisor creates (prometheus-client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), and the
supervisor alone serves ``/metrics``, summing counters and histograms over the workers. The
version gauge then shows the lowest version any live worker serves (during a hot reload the
workers may differ for up to one poll interval).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import multiprocess

#: The environment variable that switches prometheus-client to multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# From half a millisecond (a cached Score) to a minute (a deadline-long wait).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class ServerMetrics:
    """The Prometheus collectors of one server process.

    Args:
        registry: where the collectors register; default a new private registry (so that
            several servers in one process, as in tests, keep separate counts). In
            multiprocess mode the values go to the shared folder whatever the registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("metarec_requests", "RPCs answered, by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("metarec_request_duration_seconds",
                                 "Time from the handler's start to its answer, by method and status code",
                                 ["method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("metarec_batch_size", "Requests adapted and scored in one model call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_time = Histogram("metarec_batch_queue_seconds",
                                    "Time a request waited in the micro-batch queue before its batch started",
                                    buckets=QUEUE_BUCKETS, registry=r)
        self.cache_lookups = Counter("metarec_adapted_user_cache_lookups",
                                     "Adapted-user cache lookups, by result (hit or miss)", ["result"], registry=r)
        self.model_version = Gauge("metarec_model_version", "The model version being served, by model name",
                                   ["model"], registry=r, multiprocess_mode="livemin")
        self.refusals = Counter("metarec_model_version_refusals",
                                "Model versions refused (failed to load or to pass the check)",
                                ["model", "version"], registry=r)
        self.log_rows = Counter("metarec_interaction_log_rows_written",
                                "Rows committed to the interaction log", registry=r)
        self.log_replays = Counter("metarec_interaction_log_replays",
                                   "LogInteractions calls whose request id was committed before (nothing stored)",
                                   registry=r)

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """One answered call: ``code`` is the status code's name (``"OK"``, ``"NOT_FOUND"``)."""
        self.requests.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)

    def observe_batch(self, size: int, queue_seconds: Iterable[float]) -> None:
        """One model call of ``size`` requests, each of which waited ``queue_seconds``."""
        self.batch_size.observe(size)
        for seconds in queue_seconds:
            self.queue_time.observe(seconds)

    def observe_cache_lookup(self, hit: bool) -> None:
        self.cache_lookups.labels("hit" if hit else "miss").inc()

    def model_swapped(self, model: str, version: int) -> None:
        self.model_version.labels(model).set(version)

    def version_refused(self, model: str, version: int) -> None:
        self.refusals.labels(model, str(version)).inc()

    def log_written(self, rows: int, replayed: bool) -> None:
        """One LogInteractions call committed ``rows`` new rows (none for a replay)."""
        if replayed:
            self.log_replays.inc()
        else:
            self.log_rows.inc(rows)


class MetricsEndpoint:
    """The HTTP server of ``/metrics``, running on a daemon thread; :meth:`close` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_endpoint(host: str, port: int, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve ``registry`` at ``http://host:port/metrics`` (``port=0`` picks a free port).

    Raises:
        OSError: the port cannot be bound.
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server, thread)


def multiprocess_registry(folder: str | os.PathLike) -> CollectorRegistry:
    """A registry that sums what every worker wrote into ``folder`` (the supervisor's)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    return registry


def forget_worker(pid: int, folder: str | os.PathLike) -> None:
    """Drop an exited worker's live gauges (its counters keep counting in the totals)."""
    multiprocess.mark_process_dead(pid, path=str(folder))
