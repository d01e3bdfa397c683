"""``metarec serve``: run the gRPC server from the command line.

Call :func:`serve_main` with the arguments after ``serve`` (``metarec.cli`` does), or run
``python -m metarec_server.main --model-dir DIR --port N``. The server prints one line
``metarec server listening on HOST:PORT`` on stdout once it accepts connections (scripts and
tests wait for it), runs until SIGINT / SIGTERM, then drains gracefully. With ``--workers N``
this process supervises N server processes sharing the port (``metarec_server.workers``).

With ``--metrics-port N`` it serves Prometheus metrics at ``http://HOST:N/metrics`` (the metric
names are listed in ``metarec_server.metrics``) and prints ``metarec metrics on
http://HOST:N/metrics`` before the listening line; with ``--workers`` the supervisor serves the
sum over its workers.

The auth token is read from ``--token-file`` or the ``METAREC_AUTH_TOKEN`` environment
variable, never from the command line, where other local users could read it in ``ps``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from metarec.backend_choice import configured_backend
from metarec.interaction_log import is_postgres_url, open_interaction_log
from metarec_server.app import MetarecServer, ServerConfig
from metarec_server.batcher import BatcherConfig
from metarec_server.metrics import MULTIPROC_ENV, forget_worker, multiprocess_registry, start_metrics_endpoint
from metarec_server.validation import Limits
from metarec_server.workers import WorkerPool, reserve_port, watch_parent

TOKEN_ENV = "METAREC_AUTH_TOKEN"
METRICS_PREFIX = "metarec metrics on "

EPILOG = """\
interaction log (--log):
  A file path selects the embedded SQLite store (one host). A postgresql:// URL selects
  PostgreSQL, a log that several servers share: Recommend by user id then sees the
  interactions logged through any of them, and `metarec retrain --logs URL` reads them all.
  It needs `pip install 'metarec[postgres]'`. Keep the password out of the URL (the command
  line shows in ps): libpq reads PGPASSWORD or ~/.pgpass.
  LogInteractions calls with the same request_id store their rows once.

metrics (--metrics-port):
  Prometheus text format at http://HOST:PORT/metrics, on the --host address:
    metarec_requests_total{method,code}, metarec_request_duration_seconds{method,code}
    metarec_batch_size, metarec_batch_queue_seconds
    metarec_adapted_user_cache_lookups_total{result="hit"|"miss"}
    metarec_model_version{model}, metarec_model_version_refusals_total{model,version}
    metarec_interaction_log_rows_written_total, metarec_interaction_log_replays_total
  With --workers N the supervisor serves the sum over the workers.

tracing (--tracing, off by default):
  One OpenTelemetry server span per call, under the caller's W3C traceparent (pip install
  'metarec[tracing]'), sent over OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT (default
  http://localhost:4318); OTEL_TRACES_EXPORTER=console prints them. A tracer provider the
  process already has (opentelemetry-instrument) is kept.
"""

REQUEST_RULES = """\
request rules (INVALID_ARGUMENT otherwise):
  item ids        known to the served model's catalogue; each item at most once in a
                  request's interactions and once in its candidates
  ids, values     user and item ids, categorical values and multi-hot tokens: at most
                  --max-id-length characters
  user features   names the model knows; numbers finite. Numbers outside the range seen
                  in training are clipped to it (the SDK does the same)
  ratings         finite; inside the model's rating range, or 0/1 for implicit feedback
  request body    a valid protobuf message of the method's request type
A reply never carries a non-finite score: such a result is answered INTERNAL.
While a model folder is missing or holds no loadable version, the server logs a warning
that it waits for one (naming the folder) and answers UNAVAILABLE.
"""


def build_parser(prog: str = "metarec serve") -> argparse.ArgumentParser:
    d_batch, d_limits = BatcherConfig(), Limits()
    p = argparse.ArgumentParser(prog=prog, description="Serve a meta-learned recommender over gRPC.",
                                epilog=EPILOG + "\n" + REQUEST_RULES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, type=Path, help="folder of numbered versions: DIR/1/model.keras, ...")
    p.add_argument("--model-name", default="default", help="the model's name in requests (default: %(default)s)")
    p.add_argument("--extra-model", action="append", default=[], metavar="NAME=DIR",
                   help="one more model to serve, named NAME in requests, from the folder of numbered "
                        "versions DIR (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8500, help="port (0 picks a free one; default: %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port, one Python interpreter each (Linux; "
                        "default: %(default)s). Use about one per CPU core")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by --workers
    p.add_argument("--reuse-port", action="store_true",
                   help="share the port with other server processes (SO_REUSEPORT); --workers sets it")
    p.add_argument("--log", "--log-db", dest="log", default="metarec-interactions.sqlite", metavar="PATH_OR_URL",
                   help="interaction log: a SQLite file, or a postgresql:// URL for a log that several "
                        "servers share (default: %(default)s; see below)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port; "
                        "default: no metrics endpoint; see below)")
    p.add_argument("--metrics-in-supervisor", action="store_true", help=argparse.SUPPRESS)  # set by --workers
    p.add_argument("--tracing", action="store_true",
                   help="trace every call with OpenTelemetry, exported over OTLP/HTTP (off by "
                        "default; needs pip install 'metarec[tracing]'; see below)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain; enables TLS with --tls-key")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--token-file", type=Path, help=f"file holding the bearer token (or set ${TOKEN_ENV})")
    p.add_argument("--max-batch-size", type=int, default=d_batch.max_batch_size,
                   help="most requests adapted and scored in one model call (default: %(default)s)")
    p.add_argument("--max-batch-delay-ms", type=float, default=d_batch.max_delay_s * 1000,
                   help="how long an idle server waits for a batch to fill (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=d_batch.max_queue,
                   help="requests waiting for the model before RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--cache-size", type=int, default=10_000,
                   help="adapted users cached (0 disables; default: %(default)s)")
    p.add_argument("--poll-interval", type=float, default=5.0,
                   help="seconds between model-folder scans for a new version (default: %(default)s)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds to finish in-flight calls on shutdown (default: %(default)s)")
    p.add_argument("--max-message-mb", type=float, default=4.0,
                   help="largest request or reply, in MiB (default: %(default)s)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=4096,
                   help="calls in progress at once before RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--max-interactions", type=int, default=d_limits.max_interactions,
                   help="most interactions in one request (default: %(default)s)")
    p.add_argument("--max-candidates", type=int, default=d_limits.max_candidates,
                   help="most candidate items in one request (default: %(default)s)")
    p.add_argument("--max-k", type=int, default=d_limits.max_k,
                   help="largest k of a Recommend call (default: %(default)s)")
    p.add_argument("--max-log-rows", type=int, default=d_limits.max_log_rows,
                   help="most interactions in one LogInteractions call (default: %(default)s)")
    p.add_argument("--max-id-length", type=int, default=d_limits.max_id_length,
                   help="longest user or item id, in characters (default: %(default)s)")
    p.add_argument("--max-user-features", type=int, default=d_limits.max_user_features,
                   help="most user features in one request (default: %(default)s)")
    p.add_argument("--compile-cache", type=Path, metavar="DIR",
                   help="keep compiled model programs in DIR across restarts (JAX backend: a "
                        "restarted or added worker loads them instead of compiling; TensorFlow has "
                        "no such cache and ignores it). Without it, --workers N on JAX shares a "
                        "temporary one among its workers, removed at exit")
    p.add_argument("--serve-after-warm-up", action="store_true",
                   help="report SERVING only once the first model version has compiled every served "
                        "shape (seconds to a minute later; by default it serves after its check and "
                        "compiles the rest in the background, when calls may be slower): for replicas "
                        "behind a load balancer that routes by health")
    p.add_argument("--max-feature-values", type=int, default=d_limits.max_feature_values,
                   help="most values of one multi-hot user feature (default: %(default)s); each "
                        "categorical value or token is at most --max-id-length characters")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="the server's log on stderr (default: %(default)s; DEBUG adds the warm-up's "
                        "compiled shapes)")
    return p


def parse_extra_models(values: list[str]) -> dict[str, Path]:
    """``["NAME=DIR", ...]`` → ``{NAME: DIR}``; ``ValueError`` quoting a malformed value."""
    models: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name.strip() or not folder:
            raise ValueError(f"--extra-model takes NAME=DIR, got {value!r}")
        if name in models:
            raise ValueError(f"--extra-model names {name!r} twice (in {value!r})")
        models[name] = Path(folder)
    return models


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` of parsed arguments; ``ValueError`` for a bad value."""
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as error:
            raise ValueError(f"cannot read --token-file {str(args.token_file)!r}: {error}") from error
        if not token:
            raise ValueError(f"--token-file {str(args.token_file)!r} is empty")
    elif os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV]
    return ServerConfig(
        model_dir=args.model_dir,
        model_name=args.model_name,
        extra_models=parse_extra_models(args.extra_model),
        host=args.host,
        port=args.port,
        reuse_port=args.reuse_port,
        log_path=args.log if is_postgres_url(args.log) else Path(args.log),
        metrics_port=None if args.metrics_in_supervisor else args.metrics_port,
        tracing=args.tracing,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        auth_token=token,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        batching=BatcherConfig(args.max_batch_size, args.max_batch_delay_ms / 1000, args.max_queue),
        cache_entries=args.cache_size,
        poll_interval_s=args.poll_interval,
        grace_s=args.grace,
        compile_cache=args.compile_cache,
        serve_after_warm_up=args.serve_after_warm_up,
        limits=Limits(
            max_interactions=args.max_interactions,
            max_candidates=args.max_candidates,
            max_k=args.max_k,
            max_log_rows=args.max_log_rows,
            max_id_length=args.max_id_length,
            max_user_features=args.max_user_features,
            max_feature_values=args.max_feature_values,
        ),
    )


def serve_main(argv: list[str] | None = None, prog: str = "metarec serve") -> int:
    """Parse ``argv`` (the arguments after ``serve``), serve until a signal; exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    # The process id tells the lines of several workers apart.
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    try:
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        # ServerConfig, BatcherConfig and Limits check their values on construction.
        config = config_from_args(args)
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2

    host = f"[{config.host}]" if ":" in config.host else config.host

    def ready(port: int, metrics_port: int | None = None) -> None:
        if metrics_port is not None:
            print(f"{METRICS_PREFIX}http://{host}:{metrics_port}/metrics", flush=True)
        print(f"metarec server listening on {host}:{port}", flush=True)

    if args.workers > 1:
        return serve_workers(argv, config, args.workers, ready, prog)
    if args.parent_pid is not None:
        watch_parent(args.parent_pid)
    try:
        server = MetarecServer(config)
    except (ValueError, ImportError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    asyncio.run(server.serve(lambda port: ready(port, server.metrics_port)))
    return 0


def serve_workers(argv: list[str], config: ServerConfig, workers: int, ready, prog: str) -> int:
    """Supervise ``workers`` server processes on one port (see ``metarec_server.workers``).

    With a metrics port, the workers write their metrics into a temporary folder
    (prometheus-client's multiprocess mode) and this process serves their sum. On JAX without
    ``--compile-cache`` they share a temporary compile cache, removed when this process ends.
    """
    metrics_dir = endpoint = shared_cache = None
    try:
        hold = reserve_port(config.host, config.port)
        # Created here, once: workers starting together would race to switch it to WAL mode
        # (SQLite) or to create the tables (PostgreSQL).
        open_interaction_log(config.log_path).close()
        if config.metrics_port is not None:
            metrics_dir = tempfile.TemporaryDirectory(prefix="metarec-metrics-")
            endpoint = start_metrics_endpoint(config.host, config.metrics_port, multiprocess_registry(metrics_dir.name))
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    port = hold.getsockname()[1]
    # argparse keeps the last of repeated options: these override the user's own.
    command = [sys.executable, "-m", "metarec_server.main", *argv, "--workers", "1",
               "--port", str(port), "--reuse-port", "--parent-pid", str(os.getpid()), "--metrics-in-supervisor"]
    if config.compile_cache is None and configured_backend()[0] == "jax":
        # Without --compile-cache the workers still share one for this server's lifetime: a
        # restarted worker then loads what the others compiled instead of compiling again.
        shared_cache = tempfile.TemporaryDirectory(prefix="metarec-compile-cache-")
        command += ["--compile-cache", shared_cache.name]
        logging.getLogger(__name__).info(
            "workers share the compile cache %s (removed at exit; --compile-cache DIR keeps one "
            "across restarts of the whole server)", shared_cache.name)
    env = None
    on_exit = None
    if metrics_dir is not None:
        env = {**os.environ, MULTIPROC_ENV: metrics_dir.name}
        on_exit = lambda pid: forget_worker(pid, metrics_dir.name)  # noqa: E731
    pool = WorkerPool(command, workers, env=env, stop_timeout_s=config.grace_s + 65, on_exit=on_exit)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: pool.request_stop())
    try:
        try:
            pool.start()
        except RuntimeError as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 1
        ready(port, endpoint.port if endpoint is not None else None)
        pool.wait()
        logging.getLogger(__name__).info("stopping %d workers", workers)
        return pool.stop()
    finally:
        hold.close()
        if endpoint is not None:
            endpoint.close()
            metrics_dir.cleanup()
        if shared_cache is not None:
            shared_cache.cleanup()


if __name__ == "__main__":
    sys.exit(serve_main(prog="python -m metarec_server.main"))
