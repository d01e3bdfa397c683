"""Bad values that used to pass: a real server on loopback, one small trained model.

Covers out-of-range numeric features (clipped, never a non-finite score with OK), a model
that scores NaN (INTERNAL), corrupt request bodies (INVALID_ARGUMENT), one rule for repeated
items, the length of categorical values, refusal reasons without the server's paths, and a
model folder that is missing or empty.
"""

import logging
import os
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

keras = pytest.importorskip("keras")
metarec = pytest.importorskip("metarec")

from metarec.api.v1 import recommender_pb2 as pb  # noqa: E402
from metarec.api.v1 import recommender_pb2_grpc as pb_grpc  # noqa: E402
from metarec_server.app import ServerConfig  # noqa: E402
from metarec_server.background import BackgroundServer  # noqa: E402
from metarec_server.registry import ModelRegistry  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SUPPORT = [("5", 5.0), ("17", 4.0), ("42", 1.0), ("60", 3.0)]


@pytest.fixture(scope="module")
def learner(small_maml):
    return small_maml[0]


def publish(folder, learner):
    tmp = folder.parent / f".tmp-{folder.name}"
    tmp.mkdir(parents=True)
    learner.save(tmp / "model.keras")
    os.rename(tmp, folder)


@pytest.fixture(scope="module")
def server(learner, tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    publish(root / "models" / "1", learner)
    # A copy whose output layer's weights are NaN: every score it makes is NaN.
    broken = metarec.load(root / "models" / "1" / "model.keras")
    kernel = broken.model.layers[-1].weights[0]
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    publish(root / "nan" / "1", broken)
    config = ServerConfig(model_dir=root / "models", extra_models={"nan": root / "nan"}, port=0,
                          log_path=root / "log.sqlite", poll_interval_s=0.1, grace_s=2.0,
                          check=lambda model: None)  # the NaN model must load
    with BackgroundServer(config) as running:
        yield running, root


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server[0].address) as channel:
        yield pb_grpc.RecommenderServiceStub(channel), channel


def user(features=None, interactions=SUPPORT):
    context = pb.UserContext(interactions=[pb.Interaction(item_id=i, rating=r) for i, r in interactions])
    for name, value in (features or {}).items():
        if isinstance(value, str):
            context.features[name].string_value = value
        else:
            context.features[name].number_value = value
    return context


def refused(stub, request, method="Score"):
    with pytest.raises(grpc.RpcError) as error:
        getattr(stub, method)(request, timeout=30)
    return error.value.code(), error.value.details()


def test_numeric_features_outside_the_training_range_are_clipped(stub, learner):
    service, _ = stub
    spec = learner.encoder.feature_specs["age"]
    candidates = ["1", "2", "3", "4"]
    oldest = service.Score(pb.ScoreRequest(user=user({"age": spec.high}), candidate_item_ids=candidates), timeout=30)
    for age in (1000.0, 1e308):
        got = service.Score(pb.ScoreRequest(user=user({"age": age}), candidate_item_ids=candidates), timeout=30)
        assert np.isfinite(got.scores).all()
        np.testing.assert_allclose(got.scores, oldest.scores, rtol=1e-6)
        recs = service.Recommend(pb.RecommendRequest(user=user({"age": age}), k=5), timeout=30)
        assert len(recs.item_ids) == 5 and np.isfinite(recs.scores).all()
    # The SDK gives the same scores: one rule, in the encoder both use.
    sdk = learner.adapt(metarec_frame(SUPPORT), {"age": 1e308}).score([1, 2, 3, 4])
    np.testing.assert_allclose(oldest.scores, sdk, rtol=1e-5, atol=1e-6)


def metarec_frame(rows):
    import pandas as pd

    return pd.DataFrame({"item_id": [int(i) for i, _ in rows], "rating": [r for _, r in rows]})


def test_a_non_finite_score_never_leaves_with_ok(stub):
    service, _ = stub
    for method, request in (("Score", pb.ScoreRequest(user=user(), model=pb.ModelSpec(name="nan"))),
                            ("Recommend", pb.RecommendRequest(user=user(), k=5, model=pb.ModelSpec(name="nan")))):
        code, details = refused(service, request, method)
        assert code == grpc.StatusCode.INTERNAL
        assert "model 'nan' version 1 produced non-finite scores" in details
    # The good model on the same server is unaffected.
    assert len(service.Recommend(pb.RecommendRequest(user=user(), k=5), timeout=30).item_ids) == 5


def test_a_corrupt_request_body_is_invalid_argument_with_a_plain_message(stub):
    _, channel = stub
    raw = channel.unary_unary("/metarec.v1.RecommenderService/Score")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as error:
        raw(b"\xff\xff\xff\xff", timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "the request body (4 bytes) is not a valid metarec.v1.ScoreRequest message"
    # A valid body through the same raw path still works.
    reply = pb.ScoreResponse.FromString(raw(pb.ScoreRequest(user=user(), candidate_item_ids=["1"]).SerializeToString(),
                                            timeout=30))
    assert len(reply.scores) == 1


def test_repeated_items_follow_one_rule_in_interactions_and_candidates(stub):
    service, _ = stub
    code, details = refused(service, pb.ScoreRequest(user=user(interactions=SUPPORT + [("17", 2.0)])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("interaction item ids contain duplicates (1 repeated, e.g. '17')")
    code, details = refused(service, pb.ScoreRequest(user=user(), candidate_item_ids=["3", "9", "3"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("candidate item ids contain duplicates (1 repeated, e.g. '3')")


def test_a_user_id_support_counts_a_repeatedly_logged_item_once_with_its_latest_rating(stub):
    """Recommend and Score by user id build the support from the log, which keeps every row:
    an item logged twice counts once, with the rating logged last, as a request must."""
    service, _ = stub
    rows = [("5", 1.0, 100), ("17", 4.0, 101), ("5", 5.0, 102), ("42", 1.0, 103), ("17", 2.0, 104)]
    service.LogInteractions(pb.LogInteractionsRequest(user_id="twice", interactions=[
        pb.Interaction(item_id=i, rating=r, timestamp=t) for i, r, t in rows]), timeout=30)
    candidates = ["3", "9", "60", "77"]
    by_id = service.Score(pb.ScoreRequest(user=pb.UserContext(user_id="twice"),
                                          candidate_item_ids=candidates), timeout=30)
    latest = service.Score(pb.ScoreRequest(user=user(interactions=[("5", 5.0), ("42", 1.0), ("17", 2.0)]),
                                           candidate_item_ids=candidates), timeout=30)
    first = service.Score(pb.ScoreRequest(user=user(interactions=[("5", 1.0), ("17", 4.0), ("42", 1.0)]),
                                          candidate_item_ids=candidates), timeout=30)
    scores = [list(r.scores) for r in (by_id, latest, first)]
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5)
    assert not np.allclose(scores[0], scores[2], rtol=1e-5)


def test_categorical_values_are_capped_like_ids(stub):
    service, _ = stub
    assert service.Score(pb.ScoreRequest(user=user({"segment": "x" * 256}), candidate_item_ids=["1"]),
                         timeout=30).scores
    for length in (257, 1_000_000):
        code, details = refused(service, pb.ScoreRequest(user=user({"segment": "x" * length}),
                                                         candidate_item_ids=["1"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"user feature 'segment' (categorical): a value is {length} characters long (max 256)" in details


def test_refusal_reasons_show_paths_relative_to_the_model_dir(stub, server):
    service, _ = stub
    _, root = server
    (root / "models" / "2").mkdir()  # a version folder without a model file
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = service.GetModelStatus(pb.GetModelStatusRequest(name="default"), timeout=30).models[0]
            if status.refused:
                break
            time.sleep(0.1)
        assert [r.version for r in status.refused] == [2] and status.version == 1
        reason = status.refused[0].reason
        assert str(root) not in reason
        assert reason == "FileNotFoundError: 2: expected model.keras or exactly one *.keras file, found none"
    finally:
        shutil.rmtree(root / "models" / "2")


def test_serve_on_a_missing_model_folder_says_it_waits(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "metarec_server.main", "--model-dir", str(tmp_path / "nope"),
                             "--port", "0", "--log-db", str(tmp_path / "log.sqlite")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "waiting for one" in line:
                break
        assert f"{tmp_path / 'nope'} does not exist yet; waiting for one (publish {tmp_path / 'nope' / '1' / 'model.keras'})" \
            in lines[-1], lines
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_an_empty_model_folder_logs_that_it_waits(tmp_path, caplog):
    registry = ModelRegistry("recs", tmp_path, loader=lambda folder: None)
    with caplog.at_level(logging.WARNING, logger="metarec_server.registry"):
        registry.poll()
        registry.poll()
    waiting = [r.getMessage() for r in caplog.records if "waiting for one" in r.getMessage()]
    assert len(waiting) == 1 and "holds no numbered version yet" in waiting[0]
    assert str(tmp_path / "1" / "model.keras") in waiting[0]
