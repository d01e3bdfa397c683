"""Prometheus metrics and client retries, through a real server on loopback: real calls, then a
real HTTP scrape of /metrics, whose counts must match the calls made.

One small MAML model is trained once for the module (a few seconds); the worker-pool test and
the retry test need no model (logging and UNAVAILABLE answers work without one).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

import metarec
from metarec.api.v1 import recommender_pb2 as pb
from metarec.client import Client
from metarec_server.app import ServerConfig
from metarec_server.background import BackgroundServer
from metarec_server.inference import make_check

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def scrape(port):
    """``{(metric sample name, sorted labels): value}`` from a real HTTP GET of /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            samples[(sample.name, labels)] = samples.get((sample.name, labels), 0.0) + sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    import keras

    data = metarec.datasets.synthetic(num_users=120, num_items=60, seed=0)
    tasks = metarec.UserTasks(data, support_size=5)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16,))
    learner = metarec.MAML(model, inner_steps=1, inner_lr=0.05, adapt="decision_layers")
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.fit(tasks.train, epochs=1, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("trained") / "model.keras"
    learner.save(path)
    return path


def test_a_scrape_counts_calls_batches_cache_hits_versions_and_log_rows(tmp_path, model_file):
    (tmp_path / "models" / "1").mkdir(parents=True)
    shutil.copy(model_file, tmp_path / "models" / "1" / "model.keras")
    (tmp_path / "models" / "2").mkdir()
    (tmp_path / "models" / "2" / "model.keras").write_bytes(b"not a model")  # refused
    config = ServerConfig(model_dir=tmp_path / "models", port=0, log_path=tmp_path / "log.sqlite",
                          metrics_port=0, check=make_check(batch_sizes=(1,), support_sizes=(5,)))
    support = pd.DataFrame({"item_id": [1, 2, 3, 4], "rating": [5.0, 1.0, 4.0, 2.0]})
    with BackgroundServer(config) as running, Client(running.address, timeout=60) as client:
        assert running.serving and running.server.metrics_port
        before = scrape(running.server.metrics_port)
        assert value(before, "metarec_model_version", model="default") == 1
        assert value(before, "metarec_model_version_refusals_total", model="default", version="2") == 1
        assert value(before, "metarec_requests_total", method="Recommend", code="OK") == 0

        # Sequential calls: each is its own batch of one. The first adapts (a cache miss),
        # the four others reuse the adapted user (same interactions, same version).
        for _ in range(3):
            assert len(client.recommend(support, k=5)) == 5
        for _ in range(2):
            client.score(support, candidates=[5, 6, 7])
        with pytest.raises(grpc.RpcError) as bad:
            client.recommend(support, k=0)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert client.log_interactions("u1", [(1, 4.0), (2, 3.0), (3, 5.0), (4, 1.0)], request_id="r-1") == 4
        assert client.log_interactions("u1", [(1, 4.0), (2, 3.0), (3, 5.0), (4, 1.0)], request_id="r-1") == 4

        after = scrape(running.server.metrics_port)
    assert value(after, "metarec_requests_total", method="Recommend", code="OK") == 3
    assert value(after, "metarec_requests_total", method="Recommend", code="INVALID_ARGUMENT") == 1
    assert value(after, "metarec_requests_total", method="Score", code="OK") == 2
    assert value(after, "metarec_requests_total", method="LogInteractions", code="OK") == 2
    # The client asked GetModelStatus once, for the catalogue's id type.
    assert value(after, "metarec_requests_total", method="GetModelStatus", code="OK") == 1
    assert value(after, "metarec_request_duration_seconds_count", method="Recommend", code="OK") == 3
    assert 0 < value(after, "metarec_request_duration_seconds_sum", method="Recommend", code="OK") < 60
    assert value(after, "metarec_request_duration_seconds_bucket", method="Score", code="OK", le="+Inf") == 2
    # Five requests reached the model (the bad one was refused before), in five batches of one.
    assert value(after, "metarec_batch_size_count") == 5
    assert value(after, "metarec_batch_size_sum") == 5
    assert value(after, "metarec_batch_queue_seconds_count") == 5
    assert value(after, "metarec_adapted_user_cache_lookups_total", result="miss") == 1
    assert value(after, "metarec_adapted_user_cache_lookups_total", result="hit") == 4
    assert value(after, "metarec_interaction_log_rows_written_total") == 4
    assert value(after, "metarec_interaction_log_replays_total") == 1


def test_client_retries_unavailable_calls_and_not_when_told(tmp_path):
    """No model version yet: Recommend and Score answer UNAVAILABLE. The client's default
    retry policy sends each call several times (the server counts the attempts)."""
    config = ServerConfig(model_dir=tmp_path / "models", port=0, log_path=tmp_path / "log.sqlite",
                          metrics_port=0, poll_interval_s=60)
    with BackgroundServer(config) as running:
        assert not running.serving
        port = running.server.metrics_port
        with Client(running.address, timeout=30, retry_attempts=3) as client:
            for call in (lambda: client.recommend({1: 5.0}, k=3), lambda: client.score({1: 5.0}, [1, 2])):
                with pytest.raises(grpc.RpcError) as error:
                    call()
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        samples = scrape(port)
        assert value(samples, "metarec_requests_total", method="Recommend", code="UNAVAILABLE") == 3
        assert value(samples, "metarec_requests_total", method="Score", code="UNAVAILABLE") == 3
        with Client(running.address, timeout=30, retry_attempts=1) as client:
            with pytest.raises(grpc.RpcError):
                client.recommend({1: 5.0}, k=3)
        assert value(scrape(port), "metarec_requests_total", method="Recommend", code="UNAVAILABLE") == 4
    with pytest.raises(ValueError, match="retry_attempts must be an integer in 1..5"):
        Client("127.0.0.1:1", retry_attempts=6)


def children(pid):
    """Process ids of ``pid``'s live (not zombie) child processes, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process is gone
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def test_the_supervisor_serves_the_sum_over_its_workers(tmp_path):
    """``--workers 2 --metrics-port``: calls spread over both workers (16 connections) and one
    scrape of the supervisor counts them all; a worker killed and restarted keeps its counts."""
    # The supervisor's and its workers' log, quoted when the restart does not happen.
    stderr = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "metarec_server.main", "--model-dir", str(tmp_path / "models"),
         "--log", str(tmp_path / "log.sqlite"), "--port", "0", "--workers", "2", "--metrics-port", "0",
         "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )
    try:
        metrics_line = proc.stdout.readline()
        listening = proc.stdout.readline()
        assert metrics_line.startswith("metarec metrics on http://127.0.0.1:"), metrics_line
        assert listening.startswith("metarec server listening on"), listening
        metrics_port = int(metrics_line.rsplit(":", 1)[1].split("/")[0])
        address = f"127.0.0.1:{listening.strip().rsplit(':', 1)[1]}"
        calls = 0
        with Client(address, timeout=30, connections=16) as client:
            for i in range(48):
                client.log_interactions(f"user-{i}", [(f"item-{i}", 1.0), (f"other-{i}", 0.0)])
                calls += 1
            samples = scrape(metrics_port)
            assert value(samples, "metarec_requests_total", method="LogInteractions", code="OK") == calls
            assert value(samples, "metarec_interaction_log_rows_written_total") == 2 * calls

            # kill -9 a worker: the supervisor starts another; the dead one's counts stay in
            # the sum, and the client's retries carry its calls over to the other worker.
            workers = children(proc.pid)
            assert len(workers) == 2
            os.kill(workers[0], signal.SIGKILL)
            # One snapshot per look: the killed worker lives on for a moment after the signal,
            # so two reads of /proc could see "two workers" and then "the killed one gone"
            # before the new one exists.
            deadline = time.monotonic() + 60
            now = children(proc.pid)
            while (len(now) != 2 or workers[0] in now) and time.monotonic() < deadline:
                time.sleep(0.2)
                now = children(proc.pid)
            assert workers[0] not in now and len(now) == 2, (
                f"workers {workers}, now {now}; log:\n" + (tmp_path / "stderr.txt").read_text()[-4000:])
            assert value(scrape(metrics_port), "metarec_requests_total", method="LogInteractions", code="OK") == calls
            for i in range(48, 64):
                client.log_interactions(f"user-{i}", [(f"item-{i}", 1.0), (f"other-{i}", 0.0)])
                calls += 1
        samples = scrape(metrics_port)
        assert value(samples, "metarec_requests_total", method="LogInteractions", code="OK") == calls
        assert value(samples, "metarec_interaction_log_rows_written_total") == 2 * calls
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        stderr.close()


def test_tracing_makes_one_server_span_per_call_under_the_callers_trace(tmp_path):
    """``tracing=True``: each call is a server span named after its method, the child of the
    trace context the caller sent (W3C traceparent), with its status code."""
    trace = pytest.importorskip("opentelemetry.trace")
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the process's provider, as an SDK set-up would make it
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another test already set this process's OpenTelemetry provider")

    config = ServerConfig(model_dir=tmp_path / "models", port=0, log_path=tmp_path / "log.sqlite",
                          poll_interval_s=60, tracing=True)
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    metadata = (("traceparent", f"00-{trace_id}-{parent_id}-01"),)
    with BackgroundServer(config) as running, grpc.insecure_channel(running.address) as channel:
        from metarec.api.v1 import recommender_pb2_grpc as pb_grpc

        stub = pb_grpc.RecommenderServiceStub(channel)
        stub.GetModelStatus(pb.GetModelStatusRequest(), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Recommend(pb.RecommendRequest(k=3), metadata=metadata, timeout=10)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    status, recommend = (spans["metarec.v1.RecommenderService/GetModelStatus"],
                         spans["metarec.v1.RecommenderService/Recommend"])
    for span in (status, recommend):
        assert span.kind == trace.SpanKind.SERVER
        assert format(span.context.trace_id, "032x") == trace_id
        assert format(span.parent.span_id, "016x") == parent_id
        assert span.attributes["rpc.service"] == "metarec.v1.RecommenderService"
    assert status.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert status.status.is_ok
    assert recommend.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert recommend.status.status_code == trace.StatusCode.ERROR


class _OtlpReceiver:
    """An OTLP/HTTP trace receiver on loopback: keeps the body of every POST to /v1/traces."""

    def __init__(self):
        import http.server
        import threading

        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        found = []
        for body in list(self.bodies):
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    found += [(service.get("service.name"), span) for span in scope.spans]
        return found


def test_serve_tracing_exports_spans_over_otlp_http_with_no_set_up_of_its_own(tmp_path):
    """``metarec serve --tracing`` as a user runs it, with nothing but the standard OTEL_*
    variables: the server sets up the OpenTelemetry SDK, and its spans reach an OTLP/HTTP
    collector (a real HTTP receiver here, decoding the protobuf export requests)."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    receiver = _OtlpReceiver()
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_SERVICE_NAME="recs-eu",
               OTEL_BSP_SCHEDULE_DELAY="100")
    env.pop("OTEL_TRACES_EXPORTER", None)
    proc = subprocess.Popen([sys.executable, "-m", "metarec_server.main", "--model-dir", str(tmp_path / "models"),
                             "--port", "0", "--log-db", str(tmp_path / "log.sqlite"), "--tracing"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip().rsplit(" ", 1)[1]
        with Client(address, timeout=30, retry_attempts=1) as client:
            with pytest.raises(grpc.RpcError) as error:
                client.recommend({1: 5.0}, k=3)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # no model version yet
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                span.name.endswith("/Recommend") for _, span in receiver.spans()):
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        receiver.server.shutdown()
    stderr = proc.stderr.read()
    assert f"tracing: one span per call, sent to the OpenTelemetry SDK, exporting to otlp ({receiver.endpoint}" \
        in stderr, stderr
    recommend = [(service, span) for service, span in receiver.spans() if span.name.endswith("/Recommend")]
    assert len(recommend) == 1, receiver.spans()
    service, span = recommend[0]
    assert service == "recs-eu" and span.name == "metarec.v1.RecommenderService/Recommend"
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["rpc.grpc.status_code"].int_value == grpc.StatusCode.UNAVAILABLE.value[0]


@pytest.mark.parametrize("variables, message", [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER names 'zipkin', but no installed package provides"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"},
     "OTEL_EXPORTER_OTLP_PROTOCOL must be one of ['grpc', 'http/protobuf']; got 'carrier-pigeon'"),
])
def test_serve_tracing_names_a_missing_exporter(tmp_path, variables, message):
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-m", "metarec_server.main", "--model-dir", str(tmp_path / "models"),
                           "--port", "0", "--log-db", str(tmp_path / "log.sqlite"), "--tracing"],
                          env={**env, **variables}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_the_supervisor_shows_the_served_version_and_every_workers_refusal(tmp_path, model_file):
    """``--workers 2``: the version gauge is the version the workers serve (one series, not
    one per worker), and a corrupt new version is refused by each worker, which the summed
    refusal counter shows twice."""
    (tmp_path / "models" / "1").mkdir(parents=True)
    shutil.copy(model_file, tmp_path / "models" / "1" / "model.keras")
    stderr = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "metarec_server.main", "--model-dir", str(tmp_path / "models"),
         "--log", str(tmp_path / "log.sqlite"), "--port", "0", "--workers", "2", "--metrics-port", "0",
         "--poll-interval", "0.2", "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )
    try:
        metrics_port = int(proc.stdout.readline().rsplit(":", 1)[1].split("/")[0])
        proc.stdout.readline()  # listening

        def wait_for(name, expected, **labels):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                got = value(scrape(metrics_port), name, **labels)
                if got == expected:
                    return
                time.sleep(0.2)
            raise AssertionError(f"{name}{labels} is {got}, not {expected}; log:\n"
                                 + (tmp_path / "stderr.txt").read_text()[-3000:])

        wait_for("metarec_model_version", 1, model="default")
        (tmp_path / "models" / ".tmp-2").mkdir()
        (tmp_path / "models" / ".tmp-2" / "model.keras").write_bytes(b"not a keras archive")
        os.rename(tmp_path / "models" / ".tmp-2", tmp_path / "models" / "2")
        wait_for("metarec_model_version_refusals_total", 2, model="default", version="2")
        # Still version 1 (the lowest any live worker serves, not a sum over the workers).
        assert value(scrape(metrics_port), "metarec_model_version", model="default") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        stderr.close()
