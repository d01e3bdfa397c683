"""End to end with a real meta-learned model: a real server on loopback and the SDK client.

One small MAML model is trained once for the module (a few seconds) and saved as version 1.
"""

import concurrent.futures
import os
import shutil
import threading
import time

import grpc
import numpy as np
import pandas as pd
import pytest

keras = pytest.importorskip("keras")
metarec = pytest.importorskip("metarec")

from metarec.api.v1 import recommender_pb2 as pb  # noqa: E402
from metarec.api.v1 import recommender_pb2_grpc as pb_grpc  # noqa: E402
from metarec.client import Client  # noqa: E402
from metarec_server.app import ServerConfig  # noqa: E402
from metarec_server.background import BackgroundServer  # noqa: E402
from metarec_server.batcher import BatcherConfig  # noqa: E402
from metarec_server.inference import make_check  # noqa: E402
from metarec_server.validation import Limits  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    data = metarec.datasets.synthetic(seed=0)
    tasks = metarec.UserTasks(data, support_size=10)
    model = metarec.models.rating_mlp(tasks.encoder)
    learner = metarec.MAML(model, inner_steps=2, inner_lr=0.05, adapt="decision_layers")
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.fit(tasks.train, epochs=1, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("trained") / "model.keras"
    learner.save(path)
    return path


@pytest.fixture(scope="module")
def sdk(model_file):
    """The same model loaded through the SDK, as a user of the library would."""
    return metarec.load(model_file)


def publish(model_dir, version, source):
    """Publish a version atomically: copy into a hidden folder, then rename."""
    tmp = model_dir / f".tmp-{version}"
    tmp.mkdir(parents=True)
    shutil.copy(source, tmp / "model.keras")
    os.rename(tmp, model_dir / str(version))


def bare_server_config(root, source, **overrides):
    """Publish ``source`` as version 1 under ``root/models`` and configure a server on a free
    port with no cache and no load-time check (what the overload, deadline and shutdown tests
    need); ``overrides`` set any other ``ServerConfig`` field."""
    publish(root / "models", 1, source)
    settings = dict(model_dir=root / "models", port=0, log_path=root / "log.sqlite",
                    cache_entries=0, check=lambda model: None)
    settings.update(overrides)
    return ServerConfig(**settings)


@pytest.fixture(scope="module")
def running(model_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    publish(root / "models", 1, model_file)
    config = ServerConfig(
        model_dir=root / "models",
        port=0,
        log_path=root / "log.sqlite",
        poll_interval_s=0.1,
        batching=BatcherConfig(max_batch_size=16, max_delay_s=0.002),
        # Fewer candidates than the 400 catalogue items, so that the limit can be exceeded
        # with distinct, known ids.
        limits=Limits(max_interactions=50, max_candidates=300, max_k=100),
        grace_s=5.0,
        # The real check with a lighter warm-up than the production default, to keep the
        # reload test quick on a busy 2-core machine.
        check=make_check(batch_sizes=(1, 16), support_sizes=(5,)),
    )
    with BackgroundServer(config) as server:
        assert server.serving
        yield server


@pytest.fixture(scope="module")
def client(running):
    with Client(running.address, timeout=30) as c:
        yield c


SUPPORT = pd.DataFrame({"item_id": [5, 17, 42, 99, 230, 301], "rating": [5.0, 4.0, 1.0, 3.0, 2.0, 4.0]})
FEATURES = {"segment": "segment_1", "age": 31}
CANDIDATES = [3, 8, 17, 64, 128, 200, 250, 399]


def sdk_scores(sdk, support, features, candidates=None):
    adapted = sdk.adapt_many([support], [features])[0]
    return adapted, adapted.score(candidates)


# ---------------------------------------------------------------------------- correctness
def test_score_equals_sdk_adapt_then_score(client, sdk):
    _, expected = sdk_scores(sdk, SUPPORT, FEATURES, CANDIDATES)
    got = client.score(SUPPORT, CANDIDATES, user_features=FEATURES)
    assert got.item_ids == CANDIDATES
    np.testing.assert_allclose(got.scores, expected, rtol=1e-6, atol=1e-6)


def test_recommend_equals_sdk_recommend(client, sdk):
    adapted, _ = sdk_scores(sdk, SUPPORT, FEATURES)
    expected = adapted.learner.recommend_many([adapted], 10, True, None)[0]
    got = client.recommend(SUPPORT, k=10, user_features=FEATURES)
    assert got.item_ids == expected[0].tolist()
    np.testing.assert_allclose(got.scores, expected[1], rtol=1e-6, atol=1e-6)
    assert not set(got.item_ids) & set(SUPPORT["item_id"])  # seen items excluded by default
    assert (got.model_name, got.model_version) == ("default", 1)


def test_whole_catalogue_scores_and_include_seen(client, sdk):
    _, expected = sdk_scores(sdk, SUPPORT, FEATURES)
    got = client.score(SUPPORT, user_features=FEATURES)
    assert got.item_ids == sdk.encoder.item_ids[1:].tolist()
    np.testing.assert_allclose(got.scores, expected, rtol=1e-6, atol=1e-6)
    ids = np.asarray(got.item_ids)
    order = np.argsort(-got.scores.astype(np.float64), kind="stable")
    seen = np.isin(ids[order], SUPPORT["item_id"])
    with_seen = client.recommend(SUPPORT, k=100, exclude_seen=False, user_features=FEATURES)
    without_seen = client.recommend(SUPPORT, k=100, user_features=FEATURES)
    assert with_seen.item_ids == ids[order][:100].tolist()
    assert without_seen.item_ids == ids[order][~seen][:100].tolist()
    assert np.all(np.diff(with_seen.scores) <= 0)


def test_concurrent_batched_requests_match_single_requests(client, sdk):
    rng = np.random.default_rng(0)
    users = []
    for _ in range(24):
        items = rng.choice(np.arange(1, 401), size=8, replace=False)
        users.append(pd.DataFrame({"item_id": items, "rating": rng.integers(1, 6, size=8).astype(float)}))
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda s: client.score(s, CANDIDATES), users))
    for support, got in zip(users, results):
        _, expected = sdk_scores(sdk, support, None, CANDIDATES)
        np.testing.assert_allclose(got.scores, expected, rtol=1e-5, atol=1e-5)


def test_cache_returns_the_same_answer(client, running):
    support = {11: 5.0, 12: 1.0, 13: 4.0}
    first = client.score(support, CANDIDATES, user_id="cache-user")
    hits = running.server.cache.hits
    second = client.score(support, CANDIDATES, user_id="cache-user")
    assert running.server.cache.hits == hits + 1
    # The first answer comes from the one-call adapt+score kernel, the cached one from the
    # scoring kernel alone: equal up to float32 rounding (XLA fuses the two programs apart).
    np.testing.assert_allclose(first.scores, second.scores, rtol=1e-6, atol=1e-6)


def test_logged_interactions_stand_in_for_missing_ones(client, sdk):
    user = "logged-user"
    rows = [(7, 5.0, 100), (9, 1.0, 200), ("not-an-item", 3.0, 300), (21, 4.0, 400)]
    assert client.log_interactions(user, rows) == 4
    got = client.score(user_id=user, candidates=CANDIDATES)
    # The unknown item is skipped; the others are used in time order.
    known = pd.DataFrame({"item_id": [7, 9, 21], "rating": [5.0, 1.0, 4.0], "timestamp": [100, 200, 400]})
    _, expected = sdk_scores(sdk, known, None, CANDIDATES)
    np.testing.assert_allclose(got.scores, expected, rtol=1e-6, atol=1e-6)
    recs = client.recommend(user_id=user, k=5)
    assert not {7, 9, 21} & set(recs.item_ids)


def test_a_user_nothing_is_known_about_gets_the_meta_learned_start(client, sdk):
    # No interactions and no user id, or a user id with nothing logged: the unadapted
    # meta-model answers, exactly as the SDK's adapt() of an empty support does.
    empty = pd.DataFrame({"item_id": np.array([], np.int64), "rating": np.array([], np.float64)})
    expected = sdk.adapt(empty).score(CANDIDATES)
    for kwargs in ({}, {"user_id": "never-logged"}):
        got = client.score(None, CANDIDATES, **kwargs)
        np.testing.assert_allclose(got.scores, expected, rtol=1e-5, atol=1e-5)
        recs = client.recommend(None, k=5, **kwargs)
        want = sdk.adapt(empty).recommend(k=5)
        assert [int(i) for i in recs.item_ids] == want["item_id"].tolist()


def test_client_accepts_every_interaction_shape(client):
    frame = client.score(SUPPORT, CANDIDATES).scores
    as_dict = client.score(dict(zip(SUPPORT.item_id, SUPPORT.rating)), CANDIDATES).scores
    as_tuples = client.score(list(zip(SUPPORT.item_id, SUPPORT.rating)), CANDIDATES).scores
    as_records = client.score(SUPPORT.to_dict("records"), np.asarray(CANDIDATES)).scores
    for other in (as_dict, as_tuples, as_records):  # later ones are cache hits (see above)
        np.testing.assert_allclose(frame, other, rtol=1e-6, atol=1e-6)
    status = client.model_status()[0]
    assert status["state"] == "AVAILABLE" and status["num_items"] == 400
    assert status["rating_range"] == (1.0, 5.0) and status["item_id_type"] == "int"


# ---------------------------------------------------------------------------- bad input
def raw_stub(running):
    channel = grpc.insecure_channel(running.address)
    return channel, pb_grpc.RecommenderServiceStub(channel)


def user(*interactions, **features):
    return pb.UserContext(
        interactions=[pb.Interaction(item_id=str(i), rating=r) for i, r in interactions],
        features={k: v for k, v in features.items()},
    )


GOOD_USER = user((5, 5.0), (17, 2.0))
# name: (request, status code, a part of the message that names the mistake)
BAD_REQUESTS = {
    "unknown-item": (
        pb.RecommendRequest(user=user(("999999", 4.0)), k=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "interaction item id(s) unknown to the model's catalogue: '999999'",
    ),
    "empty-item": (
        pb.RecommendRequest(user=user(("", 4.0)), k=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "interactions[0].item_id must be non-empty",
    ),
    "non-canonical-id": (
        pb.RecommendRequest(user=user(("05", 4.0)), k=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown to the model's catalogue: '05'",
    ),
    "nan-rating": (
        pb.RecommendRequest(user=user((5, float("nan"))), k=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "rating must be finite",
    ),
    "rating-above-range": (
        pb.RecommendRequest(user=user((5, 6.0)), k=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "rating 6.0 is outside the rating range [1.0, 5.0]",
    ),
    "rating-below-range": (
        pb.RecommendRequest(user=user((5, 0.0)), k=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "rating 0.0 is outside the rating range [1.0, 5.0]",
    ),
    "k-zero": (pb.RecommendRequest(user=GOOD_USER, k=0), grpc.StatusCode.INVALID_ARGUMENT, "k must be >= 1, got 0"),
    "k-too-big": (pb.RecommendRequest(user=GOOD_USER, k=101), grpc.StatusCode.INVALID_ARGUMENT, "k is 101 (max 100)"),
    "too-many-interactions": (
        pb.RecommendRequest(user=user(*[(i, 3.0) for i in range(1, 52)]), k=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "51 interactions (max 50)",
    ),
    "too-many-candidates": (
        # 301 distinct ids the catalogue knows: only the limit (300 in `running`) is wrong.
        pb.RecommendRequest(user=GOOD_USER, k=5, candidate_item_ids=[str(i) for i in range(1, 302)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "301 candidates (max 300)",
    ),
    "unknown-candidate": (
        pb.RecommendRequest(user=GOOD_USER, k=5, candidate_item_ids=["1", "nope"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "candidate item id(s) unknown to the model's catalogue: 'nope'",
    ),
    "duplicate-candidates": (
        pb.RecommendRequest(user=GOOD_USER, k=5, candidate_item_ids=["1", "2", "1"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "candidate item ids contain duplicates",
    ),
    "unknown-feature": (
        pb.RecommendRequest(user=user((5, 5.0), agee=pb.FeatureValue(number_value=3)), k=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown user feature 'agee'",
    ),
    "nan-numeric-feature": (
        pb.RecommendRequest(user=user((5, 5.0), age=pb.FeatureValue(number_value=float("nan"))), k=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "user feature 'age' (numeric) must be finite",
    ),
    "text-for-numeric-feature": (
        pb.RecommendRequest(user=user((5, 5.0), age=pb.FeatureValue(string_value="old")), k=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "user feature 'age' (numeric) needs a number",
    ),
    "unknown-model": (
        pb.RecommendRequest(model=pb.ModelSpec(name="other"), user=GOOD_USER, k=5),
        grpc.StatusCode.NOT_FOUND,
        "unknown model 'other'",
    ),
    "unserved-version": (
        pb.RecommendRequest(model=pb.ModelSpec(version=7), user=GOOD_USER, k=5),
        grpc.StatusCode.NOT_FOUND,
        "version 7 is not served (serving version 1)",
    ),
}
# ScoreRequest carries the same model, user and candidates, but no k.
SCORE_CASES = sorted(name for name in BAD_REQUESTS if not name.startswith("k-"))


def as_score_request(request):
    return pb.ScoreRequest(model=request.model, user=request.user, candidate_item_ids=request.candidate_item_ids)


@pytest.mark.parametrize(
    "rpc, name", [("Recommend", n) for n in sorted(BAD_REQUESTS)] + [("Score", n) for n in SCORE_CASES]
)
def test_bad_requests_get_their_status_and_the_server_keeps_serving(running, rpc, name):
    request, code, detail = BAD_REQUESTS[name]
    if rpc == "Score":
        request = as_score_request(request)
    channel, api = raw_stub(running)
    with channel:
        call = getattr(api, rpc)
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30)
        assert info.value.code() == code, info.value.details()
        assert detail in info.value.details()
        good = pb.RecommendRequest(user=GOOD_USER, k=3, candidate_item_ids=[str(c) for c in CANDIDATES])
        reply = call(good if rpc == "Recommend" else as_score_request(good), timeout=30)
        assert len(reply.item_ids) == (3 if rpc == "Recommend" else len(CANDIDATES))


def test_a_request_at_the_candidate_limit_is_served(running):
    """300 candidates (the limit in `running`) are scored; 301 are refused (BAD_REQUESTS)."""
    channel, api = raw_stub(running)
    with channel:
        at_limit = [str(i) for i in range(1, 301)]
        reply = api.Score(pb.ScoreRequest(user=GOOD_USER, candidate_item_ids=at_limit), timeout=60)
        assert list(reply.item_ids) == at_limit


def test_unknown_categories_are_accepted_as_out_of_vocabulary(client):
    got = client.recommend(SUPPORT, k=3, user_features={"segment": "brand-new-segment"})
    assert len(got) == 3


def test_deadline_exceeded_and_server_keeps_serving(running, client):
    channel, api = raw_stub(running)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            api.Recommend(pb.RecommendRequest(user=GOOD_USER, k=3), timeout=0.0005)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(client.recommend(SUPPORT, k=3)) == 3


# ---------------------------------------------------------------------------- server-side deadlines
class Gate:
    """Holds the batcher's worker at the start of every batch until ``open()``: requests
    sent meanwhile wait in the server's queue for as long as a test needs."""

    def __init__(self, batcher):
        self.holding = threading.Event()  # a batch is waiting at the gate
        self._open = threading.Event()
        process = batcher._process

        def gated(key, items):
            self.holding.set()
            self._open.wait(120)
            return process(key, items)

        batcher._process = gated

    def open(self):
        self._open.set()


class Aborted(Exception):
    pass


class DirectContext:
    """What the handlers use of a ``grpc.aio.ServicerContext``, to call them directly."""

    def __init__(self, remaining=None):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining

    async def abort(self, code, details):
        raise Aborted(code, details)


@pytest.fixture
def gated(model_file, tmp_path):
    """A server that batches one request at a time behind a gate (see Gate)."""
    config = bare_server_config(tmp_path, model_file,
                                batching=BatcherConfig(max_batch_size=1, max_delay_s=0, max_queue=100))
    server = BackgroundServer(config).start()
    gate = Gate(server.server.service.batcher)
    try:
        yield server, gate
    finally:
        gate.open()
        server.stop()


def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_deadline_passing_while_queued_on_the_server(gated):
    """A request whose 1 s deadline passes while it waits behind a busy batch is answered
    DEADLINE_EXCEEDED and never reaches the model; the server then serves normally."""
    server, gate = gated
    batcher = server.server.service.batcher
    channel, api = raw_stub(server)
    with channel:
        busy = api.Recommend.future(pb.RecommendRequest(user=GOOD_USER, k=3), timeout=120)
        assert gate.holding.wait(60)  # the worker is inside the first batch
        late = api.Recommend.future(pb.RecommendRequest(user=user((8, 4.0)), k=3), timeout=1.0)
        # It reached the server's queue (no tight timing: the worker waits at the gate).
        assert wait_for(lambda: batcher.submitted == 2 or late.done(), timeout=30)
        assert batcher.submitted == 2, "the request never reached the batcher"
        with pytest.raises(grpc.RpcError) as info:
            late.result(timeout=60)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.open()
        assert len(busy.result(timeout=120).item_ids) == 3
        assert len(api.Recommend(pb.RecommendRequest(user=GOOD_USER, k=3), timeout=60).item_ids) == 3
    # Three requests reached the batcher, two were processed: the late one was dropped.
    assert (batcher.submitted, batcher.items) == (3, 2)
    assert batcher.queued == 0


def test_server_side_deadline_expiry_in_the_batcher(gated):
    """The handler's own deadline path: an item whose deadline passed while queued is dropped
    by the batcher with DeadlineExpiredError (DEADLINE_EXCEEDED), and a request arriving with
    no time left is not queued at all."""
    server, gate = gated
    service, batcher = server.server.service, server.server.service.batcher
    request = pb.RecommendRequest(user=GOOD_USER, k=3)
    with pytest.raises(Aborted) as info:
        server.call(service.Recommend(request, DirectContext(remaining=0.0)), timeout=30)
    assert info.value.args == (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the request was queued")
    assert batcher.submitted == 0
    channel, api = raw_stub(server)
    with channel, concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = api.Recommend.future(request, timeout=120)
        assert gate.holding.wait(60)
        late = pool.submit(server.call, service.Recommend(request, DirectContext(remaining=0.3)), 120)
        assert wait_for(lambda: batcher.submitted == 2, timeout=30)
        time.sleep(0.4)  # its deadline (0.3 s after it was queued) has passed
        assert batcher.queued == 1
        gate.open()
        with pytest.raises(Aborted) as info:
            late.result(timeout=120)
        assert info.value.args == (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued")
        assert len(busy.result(timeout=120).item_ids) == 3
        assert batcher.items == 1  # only the busy request was processed
        assert len(api.Recommend(request, timeout=60).item_ids) == 3
    assert (batcher.submitted, batcher.items) == (3, 2)


# ---------------------------------------------------------------------------- overload & shutdown
def test_full_queue_is_resource_exhausted(model_file, tmp_path):
    config = bare_server_config(tmp_path, model_file,
                                batching=BatcherConfig(max_batch_size=1, max_delay_s=0, max_queue=1))
    with BackgroundServer(config) as server:
        channel, api = raw_stub(server)
        with channel:
            requests = [pb.RecommendRequest(user=user((i, 3.0), (i + 1, 4.0)), k=3) for i in range(1, 60)]
            futures = [api.Recommend.future(r, timeout=60) for r in requests]
            codes = []
            for f in futures:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
            assert grpc.StatusCode.OK in codes
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert len(api.Recommend(requests[0], timeout=30).item_ids) == 3  # recovers


def test_graceful_shutdown_finishes_in_flight_requests(model_file, tmp_path):
    config = bare_server_config(tmp_path, model_file, grace_s=30,
                                batching=BatcherConfig(max_batch_size=2, max_delay_s=0.001, max_queue=1000))
    server = BackgroundServer(config).start()
    channel, api = raw_stub(server)
    try:
        requests = [pb.RecommendRequest(user=user((i, 3.0), (i + 1, 4.0)), k=3) for i in range(1, 41)]
        futures = [api.Recommend.future(r, timeout=60) for r in requests]
        # Wait until every call is inside a handler (queued in the batcher, in progress or
        # done), while plenty are still waiting for the model.
        batcher = server.server.service.batcher
        deadline = time.monotonic() + 30
        while batcher.submitted < len(requests) and time.monotonic() < deadline:
            time.sleep(0.001)
        queued_at_stop = batcher.queued
        server.stop()
        outcomes = []
        for f in futures:
            try:
                outcomes.append(len(f.result().item_ids))
            except grpc.RpcError as e:
                outcomes.append(e.code())
        assert queued_at_stop >= 4  # the stop really happened with work in flight
        # Every call that was in flight when the stop began completed normally.
        assert outcomes == [3] * len(requests), [o for o in outcomes if o != 3]
        # After the stop the server takes no new calls.
        with pytest.raises(grpc.RpcError) as info:
            api.Recommend(requests[0], timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
        server.stop()


# ---------------------------------------------------------------------------- hot reload
def test_hot_reload_under_load_loses_no_request_and_refuses_a_corrupt_version(model_file, running, client, sdk):
    model_dir = running.server.config.model_dir
    stop = threading.Event()
    outcomes = []  # (worker, version) or ("error", details)
    lock = threading.Lock()

    def load(worker):
        with Client(running.address, timeout=30) as c:
            i = 0
            while not stop.is_set():
                try:
                    got = c.recommend({(worker * 7 + i) % 400 + 1: 4.0, 5: 2.0}, k=5, candidates=CANDIDATES)
                    with lock:
                        outcomes.append((worker, got.model_version))
                except grpc.RpcError as e:
                    with lock:
                        outcomes.append(("error", f"{e.code()}: {e.details()}"))
                i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        publish(model_dir, 2, model_file)  # a good new version, published under traffic
        deadline = time.monotonic() + 180
        while running.server.registries["default"].current.version != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.server.registries["default"].current.version == 2
        # A corrupt version 3: half a model file.
        tmp = model_dir / ".tmp-3"
        tmp.mkdir()
        data = model_file.read_bytes()
        (tmp / "model.keras").write_bytes(data[: len(data) // 2])
        os.rename(tmp, model_dir / "3")
        while not running.server.registries["default"].refused and time.monotonic() < deadline:
            time.sleep(0.05)
        # Traffic keeps flowing after the refusal, on version 2. (Wait for its first answer:
        # a batch size the light test check did not warm compiles at its first request.)
        while not any(v == 2 for _, v in list(outcomes)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)

    errors = [o for o in outcomes if o[0] == "error"]
    assert not errors, errors[:5]
    versions = [v for _, v in outcomes]
    assert 1 in versions and 2 in versions and 3 not in versions
    for w in range(4):  # each client sees the swap once, never going back
        seen = [v for worker, v in outcomes if worker == w]
        assert seen == sorted(seen)
    status = client.model_status()[0]
    assert status["version"] == 2 and [r["version"] for r in status["refused"]] == [3]
    # Version 2 (same weights) answers exactly like the SDK.
    _, expected = sdk_scores(sdk, SUPPORT, FEATURES, CANDIDATES)
    got = client.score(SUPPORT, CANDIDATES, user_features=FEATURES, version=2)
    np.testing.assert_allclose(got.scores, expected, rtol=1e-6, atol=1e-6)


def save_model_with_python_code(path):
    """A meta-learner whose model runs a ``keras.layers.Lambda``: a valid model file, whose
    loading would run code stored in it."""
    data = metarec.datasets.synthetic(seed=0)
    tasks = metarec.UserTasks(data, support_size=10)
    base = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16,))
    out = keras.layers.Lambda(lambda t: t * 1.0, name="stored_code")(base.output)
    learner = metarec.MAML(keras.Model(base.input, out), inner_steps=1, inner_lr=0.05, encoder=tasks.encoder)
    learner.save(path)
    return path


# Keras's refusal in safe mode, as the refused version's reason carries it.
SAFE_MODE_REFUSAL = "deserialization of a `Lambda` layer"


def test_a_version_that_needs_unsafe_deserialisation_is_refused(model_file, tmp_path):
    unsafe = save_model_with_python_code(tmp_path / "unsafe.keras")
    # Only safe mode makes it unloadable: with safe mode off it loads as a learner.
    assert isinstance(metarec.load(unsafe, safe_mode=False), metarec.MAML)
    config = bare_server_config(tmp_path, model_file, poll_interval_s=0.1)
    with BackgroundServer(config) as server, Client(server.address, timeout=60) as c:
        registry = server.server.registries["default"]
        assert registry.current.version == 1
        publish(tmp_path / "models", 2, unsafe)
        assert wait_for(lambda: registry.refused, timeout=120)
        assert registry.current.version == 1
        status = c.model_status()[0]
        assert status["version"] == 1 and [r["version"] for r in status["refused"]] == [2]
        assert SAFE_MODE_REFUSAL in status["refused"][0]["reason"], status["refused"][0]["reason"]
        got = c.recommend(SUPPORT, k=3)
        assert got.model_version == 1 and len(got) == 3


def test_memory_based_model_is_served_through_the_same_api(tmp_path):
    # A GRU reads the request's interactions; no gradient step runs at serving.
    data = metarec.datasets.synthetic(seed=0)
    tasks = metarec.UserTasks(data, support_size=10)
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16,))
    learner = metarec.MemoryLearner(model, units=8)
    learner.compile(optimizer=keras.optimizers.Adam(3e-3))
    learner.fit(tasks.train, epochs=1, verbose=0)
    learner.save(tmp_path / "memory.keras")
    publish(tmp_path / "models", 1, tmp_path / "memory.keras")
    sdk = metarec.load(tmp_path / "memory.keras")
    config = ServerConfig(model_dir=tmp_path / "models", port=0, log_path=tmp_path / "log.sqlite",
                          check=make_check(batch_sizes=(1,), support_sizes=(8,)))
    with BackgroundServer(config) as server, Client(server.address, timeout=30) as c:
        _, expected = sdk_scores(sdk, SUPPORT, FEATURES, CANDIDATES)
        got = c.score(SUPPORT, CANDIDATES, user_features=FEATURES)
        np.testing.assert_allclose(got.scores, expected, rtol=1e-6, atol=1e-6)
        # The answer depends on what the user said, through the reader alone.
        flipped = SUPPORT.assign(rating=6.0 - SUPPORT["rating"])
        other = c.score(flipped, CANDIDATES, user_features=FEATURES)
        assert np.abs(np.asarray(other.scores) - np.asarray(got.scores)).max() > 1e-5
        top = c.recommend(SUPPORT, k=5, user_features=FEATURES)
        assert len(top.item_ids) == 5 and top.model_version == 1


def test_the_load_check_compiles_what_concurrent_requests_run(sdk):
    """The version check warms the kernels of batches of different candidate lists (what
    concurrent requests carry): serving such a batch afterwards traces nothing new."""
    from metarec_server.inference import RECOMMEND, Job, ServingModel, run_batch

    model = ServingModel.from_learner(sdk)
    make_check(batch_sizes=(1, 2), support_sizes=(5,), num_candidates=300)(model)
    traced = []
    original = type(sdk).adapt_user

    def counting(self, *args, **kwargs):  # runs only while a kernel is being traced
        traced.append(1)
        return original(self, *args, **kwargs)

    items = model.catalog.all_indices
    jobs = [Job(RECOMMEND, items[10 + 5 * j: 15 + 5 * j], np.full(5, 4.0, np.float32), None, {},
                np.random.default_rng(j).permutation(items)[:300], 10, True, None) for j in range(2)]
    type(sdk).adapt_user = counting
    try:
        results = run_batch(model, jobs, None)
    finally:
        type(sdk).adapt_user = original
    assert [len(r.item_idx) for r in results] == [10, 10]
    assert not traced, "a batch of two different candidate lists was compiled at request time"
