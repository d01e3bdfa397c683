"""Server plumbing on loopback without a Keras model: health, reflection, auth, TLS, limits,
loading states, draining at shutdown, errors raised by the model and LogInteractions
validation."""

import dataclasses
import json
import logging
import shutil
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from metarec.api.v1 import recommender_pb2 as pb
from metarec.api.v1 import recommender_pb2_grpc as pb_grpc
from metarec.interaction_log import InteractionLog
from metarec_server.app import ServerConfig
from metarec_server.background import BackgroundServer
from metarec_server.inference import Catalog, ServingModel

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "s3cret-token"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "metarec.v1.RecommenderService"


def json_loader(folder):
    """A real loader of a stand-in model format (a JSON catalogue, no learner): the RPCs
    exercised here validate against the catalogue but never run model maths."""
    spec = json.loads((folder / "model.keras").read_text())
    return ServingModel(
        learner=None,
        catalog=Catalog(spec.get("items", [1, 2, 3])),
        feedback="explicit",
        rating_range=(1.0, 5.0),
        user_features={},
    )


def config(tmp_path, **overrides):
    (tmp_path / "models").mkdir(parents=True, exist_ok=True)
    base = dict(
        model_dir=tmp_path / "models",
        port=0,
        log_path=tmp_path / "log.sqlite",
        loader=json_loader,
        check=lambda model: None,
        poll_interval_s=0.05,
        grace_s=2.0,
    )
    base.update(overrides)
    return ServerConfig(**base)


def publish_json(tmp_path, version=1, spec=None):
    folder = tmp_path / "models" / str(version)
    folder.mkdir(parents=True)
    (folder / "model.keras").write_text(json.dumps(spec or {}))


class Aborted(Exception):
    pass


class DirectContext:
    """What the handlers use of a ``grpc.aio.ServicerContext``, to call them directly."""

    def time_remaining(self):
        return None

    async def abort(self, code, details):
        raise Aborted(code, details)


def stub(address, credentials=None, metadata_token=None, **options):
    channel = (
        grpc.secure_channel(address, credentials, list(options.items()))
        if credentials
        else grpc.insecure_channel(address, list(options.items()))
    )
    return channel, pb_grpc.RecommenderServiceStub(channel)


def log_request(n=1, user="u1"):
    return pb.LogInteractionsRequest(
        user_id=user, interactions=[pb.Interaction(item_id=f"i{j}", rating=3.0) for j in range(n)]
    )


def code_of(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code()


# ---------------------------------------------------------------------------- health & reflection
def test_health_follows_model_availability_and_shutdown(tmp_path):
    with BackgroundServer(config(tmp_path, grace_s=30), wait_for_model=True) as running:
        with grpc.insecure_channel(running.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = lambda service="": health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert check() == health_pb2.HealthCheckResponse.NOT_SERVING  # no version yet
            assert check("metarec.v1.RecommenderService") == health_pb2.HealthCheckResponse.NOT_SERVING
            mdir = tmp_path / "models" / "1"
            mdir.mkdir()
            (mdir / "model.keras").write_text(json.dumps({"ok": True}))
            deadline = time.monotonic() + 10
            while check() != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
                time.sleep(0.05)
            assert check("metarec.v1.RecommenderService") == health_pb2.HealthCheckResponse.SERVING
            # Once the stop begins both turn NOT_SERVING, during the grace window: watches
            # opened before the stop see it (gRPC refuses new calls once it stops).
            watches = [health.Watch(health_pb2.HealthCheckRequest(service=s), timeout=60) for s in ("", SERVICE)]
            assert [next(w).status for w in watches] == [SERVING, SERVING]
            stopper = threading.Thread(target=running.stop)
            stopper.start()
            try:
                assert [next(w).status for w in watches] == [NOT_SERVING, NOT_SERVING]
                assert stopper.is_alive()  # the open watches hold the grace window
            finally:
                for w in watches:
                    w.cancel()
                stopper.join(60)
            assert not stopper.is_alive()


def test_calls_reaching_the_service_while_draining_are_unavailable(tmp_path):
    publish_json(tmp_path)
    with BackgroundServer(config(tmp_path, grace_s=30)) as running:
        service = running.server.service
        with grpc.insecure_channel(running.address) as channel:
            # A call in flight before the stop keeps the server in its grace window.
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
            # Health follows the registry within HEALTH_REFRESH_S: wait for SERVING.
            while next(watch).status != SERVING:
                pass
            stopper = threading.Thread(target=running.stop)
            stopper.start()
            try:
                assert next(watch).status == NOT_SERVING  # draining has begun
                interactions = [pb.Interaction(item_id="1", rating=3)]
                calls = {
                    "Recommend": pb.RecommendRequest(user=pb.UserContext(interactions=interactions), k=2),
                    "Score": pb.ScoreRequest(user=pb.UserContext(interactions=interactions)),
                    "LogInteractions": log_request(),
                    "GetModelStatus": pb.GetModelStatusRequest(),
                }
                for method, request in calls.items():
                    with pytest.raises(Aborted) as info:
                        running.call(getattr(service, method)(request, DirectContext()), timeout=30)
                    assert info.value.args == (grpc.StatusCode.UNAVAILABLE, "server is shutting down"), method
                assert stopper.is_alive()
            finally:
                watch.cancel()
                stopper.join(60)
            assert not stopper.is_alive()
    log = InteractionLog(tmp_path / "log.sqlite")
    try:
        assert log.count() == 0  # the refused LogInteractions stored nothing
    finally:
        log.close()


def test_reflection_lists_and_describes_the_service(tmp_path):
    with BackgroundServer(config(tmp_path)) as running:
        with grpc.insecure_channel(running.address) as channel:
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = list(
                refl.ServerReflectionInfo(
                    iter(
                        [
                            reflection_pb2.ServerReflectionRequest(list_services=""),
                            reflection_pb2.ServerReflectionRequest(
                                file_containing_symbol="metarec.v1.RecommenderService"
                            ),
                        ]
                    ),
                    timeout=5,
                )
            )
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"metarec.v1.RecommenderService", "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # the .proto, for grpcurl


# ---------------------------------------------------------------------------- model states
def test_requests_are_unavailable_until_a_version_loads(tmp_path):
    release = threading.Event()

    def slow_loader(folder):
        release.wait(20)
        return json_loader(folder)

    (tmp_path / "models" / "1").mkdir(parents=True)
    (tmp_path / "models" / "1" / "model.keras").write_text("{}")
    with BackgroundServer(config(tmp_path, loader=slow_loader), wait_for_model=False) as running:
        channel, api = stub(running.address)
        with channel:
            request = pb.RecommendRequest(
                user=pb.UserContext(interactions=[pb.Interaction(item_id="1", rating=3)]), k=5
            )
            assert code_of(api.Recommend, request, timeout=5) == grpc.StatusCode.UNAVAILABLE
            status = api.GetModelStatus(pb.GetModelStatusRequest(), timeout=5).models[0]
            assert status.state == pb.ModelStatus.LOADING
            # Logging does not need a model.
            assert api.LogInteractions(log_request(), timeout=5).stored == 1
            release.set()
            deadline = time.monotonic() + 10
            while status.state != pb.ModelStatus.AVAILABLE and time.monotonic() < deadline:
                time.sleep(0.05)
                status = api.GetModelStatus(pb.GetModelStatusRequest(), timeout=5).models[0]
            assert status.state == pb.ModelStatus.AVAILABLE and status.version == 1


def test_status_reports_refused_versions_and_unknown_models(tmp_path):
    (tmp_path / "models" / "4").mkdir(parents=True)
    (tmp_path / "models" / "4" / "model.keras").write_text("{broken")
    with BackgroundServer(config(tmp_path)) as running:
        channel, api = stub(running.address)
        with channel:
            status = api.GetModelStatus(pb.GetModelStatusRequest(name="default"), timeout=5).models[0]
            assert status.state == pb.ModelStatus.UNAVAILABLE
            assert [r.version for r in status.refused] == [4] and "JSONDecodeError" in status.refused[0].reason
            assert code_of(api.GetModelStatus, pb.GetModelStatusRequest(name="nope"), timeout=5) == (
                grpc.StatusCode.NOT_FOUND
            )
            request = pb.ScoreRequest(
                model=pb.ModelSpec(name="nope"), user=pb.UserContext(interactions=[pb.Interaction(item_id="1", rating=3)])
            )
            assert code_of(api.Score, request, timeout=5) == grpc.StatusCode.NOT_FOUND
            request.model.name = ""
            assert code_of(api.Score, request, timeout=5) == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------- log validation
@pytest.mark.parametrize(
    "request_",
    [
        pb.LogInteractionsRequest(user_id="", interactions=[pb.Interaction(item_id="a", rating=1)]),
        pb.LogInteractionsRequest(user_id="u", interactions=[]),
        pb.LogInteractionsRequest(user_id="u", interactions=[pb.Interaction(item_id="", rating=1)]),
        pb.LogInteractionsRequest(user_id="u", interactions=[pb.Interaction(item_id="a", rating=float("nan"))]),
        pb.LogInteractionsRequest(user_id="u", interactions=[pb.Interaction(item_id="a", rating=float("inf"))]),
        pb.LogInteractionsRequest(user_id="u", interactions=[pb.Interaction(item_id="a", rating=1, timestamp=-5)]),
        pb.LogInteractionsRequest(user_id="u" * 300, interactions=[pb.Interaction(item_id="a", rating=1)]),
    ],
    ids=["no-user", "no-rows", "empty-item", "nan", "inf", "negative-time", "long-user"],
)
def test_bad_log_requests_are_invalid_argument_and_store_nothing(tmp_path, request_):
    with BackgroundServer(config(tmp_path)) as running:
        channel, api = stub(running.address)
        with channel:
            assert code_of(api.LogInteractions, request_, timeout=5) == grpc.StatusCode.INVALID_ARGUMENT
            assert api.LogInteractions(log_request(), timeout=5).stored == 1  # still serving
        assert running.server.interaction_log.count() == 1


def implicit_loader(folder):
    return dataclasses.replace(json_loader(folder), feedback="implicit", rating_range=(0.0, 1.0))


@pytest.mark.parametrize(
    "loader, bad, good, message",
    [
        (json_loader, [6.0, 0.5], 5.0, "is outside the rating range [1.0, 5.0]"),
        (implicit_loader, [0.5, 2.0], 1.0, "implicit feedback needs a 0 or 1 label"),
    ],
    ids=["explicit", "implicit"],
)
def test_logged_ratings_are_checked_against_the_loaded_model(tmp_path, loader, bad, good, message):
    publish_json(tmp_path)
    with BackgroundServer(config(tmp_path, loader=loader)) as running:
        assert running.serving
        channel, api = stub(running.address)
        with channel:
            for rating in bad:
                # A valid first row does not get stored either: a call is stored whole or not at all.
                request = pb.LogInteractionsRequest(
                    user_id="u",
                    interactions=[pb.Interaction(item_id="a", rating=good), pb.Interaction(item_id="b", rating=rating)],
                )
                with pytest.raises(grpc.RpcError) as info:
                    api.LogInteractions(request, timeout=5)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details().startswith("interactions[1]:") and message in info.value.details()
            assert running.server.interaction_log.count() == 0
            good_request = pb.LogInteractionsRequest(user_id="u", interactions=[pb.Interaction(item_id="a", rating=good)])
            assert api.LogInteractions(good_request, timeout=5).stored == 1
        rows = running.server.interaction_log.user_interactions("u")
        assert [(r.item_id, r.rating) for r in rows] == [("a", good)]


def test_too_many_log_rows_and_oversize_messages(tmp_path):
    from metarec_server.validation import Limits

    cfg = config(tmp_path, limits=Limits(max_log_rows=10), max_message_bytes=16 * 1024)
    with BackgroundServer(cfg) as running:
        channel, api = stub(running.address)
        with channel:
            assert code_of(api.LogInteractions, log_request(11), timeout=5) == grpc.StatusCode.INVALID_ARGUMENT
            # Over the message-size limit gRPC itself refuses before any handler runs.
            big = pb.LogInteractionsRequest(
                user_id="u", interactions=[pb.Interaction(item_id="x" * 200, rating=1) for _ in range(100)]
            )
            assert big.ByteSize() > 16 * 1024
            assert code_of(api.LogInteractions, big, timeout=5) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert api.LogInteractions(log_request(10), timeout=5).stored == 10


# ---------------------------------------------------------------------------- errors from the model
class RefusingLearner:
    """Stands in for an SDK learner that raises ValueError on input validation let through."""

    def has_ranking_head(self):
        return False

    def adapt_score_indices(self, *args, **kwargs):
        raise ValueError("this learner cannot use these interactions")


def test_a_value_error_from_the_model_is_invalid_argument_and_logged_with_its_traceback(tmp_path, caplog):
    publish_json(tmp_path)
    loader = lambda folder: dataclasses.replace(json_loader(folder), learner=RefusingLearner())  # noqa: E731
    caplog.set_level(logging.WARNING, logger="metarec_server.service")
    with BackgroundServer(config(tmp_path, loader=loader)) as running:
        channel, api = stub(running.address)
        with channel:
            request = pb.RecommendRequest(user=pb.UserContext(interactions=[pb.Interaction(item_id="1", rating=3)]), k=2)
            with pytest.raises(grpc.RpcError) as info:
                api.Recommend(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == "this learner cannot use these interactions"
    records = [r for r in caplog.records if r.name == "metarec_server.service"]
    assert len(records) == 1, records
    assert records[0].levelno == logging.WARNING and "Recommend" in records[0].getMessage()
    assert records[0].exc_info is not None and records[0].exc_info[0] is ValueError


# ---------------------------------------------------------------------------- auth
def test_bearer_token_is_required_except_for_health(tmp_path):
    with BackgroundServer(config(tmp_path, auth_token=TOKEN)) as running:
        channel, api = stub(running.address)
        with channel:
            assert code_of(api.LogInteractions, log_request(), timeout=5) == grpc.StatusCode.UNAUTHENTICATED
            bad = (("authorization", "Bearer wrong"),)
            assert code_of(api.LogInteractions, log_request(), timeout=5, metadata=bad) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            assert code_of(api.GetModelStatus, pb.GetModelStatusRequest(), timeout=5) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", f"Bearer {TOKEN}"),)
            assert api.LogInteractions(log_request(), timeout=5, metadata=good).stored == 1
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status in (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            )
        assert running.server.interaction_log.count() == 1


# ---------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost / 127.0.0.1, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return folder / "cert.pem", folder / "key.pem"


def test_tls_with_token_end_to_end_through_the_sdk_client(tmp_path, certificate):
    from metarec.client import Client

    cert, key = certificate
    cfg = config(tmp_path, tls_cert_file=cert, tls_key_file=key, auth_token=TOKEN)
    with BackgroundServer(cfg) as running:
        with Client(f"localhost:{running.port}", token=TOKEN, tls_root_cert=cert, timeout=10) as client:
            assert client.log_interactions(7, [(1, 4.0), ("b", 2.5, 1_700_000_000)]) == 2
            assert client.model_status()[0]["name"] == "default"
        # The wrong token over TLS is still refused.
        with Client(f"localhost:{running.port}", token="nope", tls_root_cert=cert, timeout=10) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.model_status()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A plaintext client cannot talk to the TLS port.
        channel, api = stub(running.address)
        with channel:
            assert code_of(api.GetModelStatus, pb.GetModelStatusRequest(), timeout=3) == grpc.StatusCode.UNAVAILABLE
        rows = running.server.interaction_log.user_interactions("7")
    # Oldest first: "b" carries an explicit timestamp, "1" got the (later) receive time.
    assert [(r.item_id, r.rating) for r in rows] == [("b", 2.5), ("1", 4.0)]
    assert rows[0].timestamp == 1_700_000_000 and rows[1].timestamp > 1_700_000_000


def test_tls_needs_both_files(tmp_path, certificate):
    with pytest.raises(ValueError):
        config(tmp_path, tls_cert_file=certificate[0])


# ---------------------------------------------------------------------------- binding
def test_binds_loopback_by_default_and_refuses_a_taken_port(tmp_path):
    assert ServerConfig(model_dir=tmp_path).host == "127.0.0.1"
    with BackgroundServer(config(tmp_path)) as running:
        other = BackgroundServer(config(tmp_path / "second", port=running.port))
        with pytest.raises(RuntimeError):
            other.start()
        other.stop()
