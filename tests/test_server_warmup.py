"""Start-up of a served version: few compiled shapes (a small catalogue is scored whole), a
check that compiles one-user calls, a warm-up of the other shapes that runs after the first
version already serves, and batches run on ready shapes meanwhile (supports padded up, batches
split). In process, on
a real (untrained) Keras model; the compilation cache in a subprocess."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pandas as pd
import pytest

keras = pytest.importorskip("keras")
metarec = pytest.importorskip("metarec")

from metarec_server.cache import AdaptedUserCache, CacheKey  # noqa: E402
from metarec_server.inference import (  # noqa: E402
    RECOMMEND, SCORE, Job, ServingModel, WarmShapes, check_support_sizes, lower_thread_priority, make_check,
    make_warm, run_batch, short_gil_turns)
from metarec.client import Client  # noqa: E402
from metarec_server.app import ServerConfig  # noqa: E402
from metarec_server.background import BackgroundServer  # noqa: E402
from metarec_server.batcher import BatcherConfig  # noqa: E402
from metarec_server.registry import ModelRegistry  # noqa: E402


@pytest.fixture(scope="module")
def learner():
    data = metarec.datasets.synthetic(num_users=60, num_items=300, seed=0)
    tasks = metarec.UserTasks(data, support_size=5)
    keras.utils.set_random_seed(0)
    learner = metarec.MAML(metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16,)),
                           inner_steps=2, inner_lr=0.05)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.prepare(tasks.train)  # binds the encoder: an untrained model serves all the same
    return learner


def jobs_of(served, n, seed=0, cached=False):
    rng = np.random.default_rng(seed)
    items = served.catalog.all_indices
    out = []
    for j in range(n):
        support = rng.choice(items, size=int(rng.integers(1, 9)), replace=False).astype(np.int32)
        candidates = rng.choice(items, size=int(rng.integers(5, 60)), replace=False).astype(np.int32)
        out.append(Job(RECOMMEND if j % 2 else SCORE, support,
                       rng.integers(1, 6, len(support)).astype(np.float32), None, {}, candidates, 5,
                       True, CacheKey(f"u{j}", b"", "m", 1) if cached else None))
    return out


def assert_same(results, expected):
    assert len(results) == len(expected)
    for a, b in zip(results, expected):
        np.testing.assert_array_equal(a.item_idx, b.item_idx)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)


def test_a_small_catalogue_scored_whole_gives_each_request_its_candidates_scores(learner):
    whole = ServingModel.from_learner(learner)
    per_list = dataclasses.replace(whole, whole_catalogue_up_to=0)
    assert len(whole.catalog) <= whole.whole_catalogue_up_to
    jobs = jobs_of(whole, 5)
    assert_same(run_batch(whole, jobs, None), run_batch(per_list, jobs, None))
    # With some users cached (adapt the others, score all) and all cached (score only).
    keyed = jobs_of(whole, 5, cached=True)
    for served in (whole, per_list):
        cache = AdaptedUserCache(10)
        run_batch(served, keyed[:2], cache)
        partly = run_batch(served, keyed, cache)
        assert_same(run_batch(served, keyed, cache), partly)
    assert_same(partly, run_batch(whole, keyed, AdaptedUserCache(10)))


def test_while_warming_a_batch_runs_on_the_cheapest_ready_shape():
    shapes = WarmShapes()
    assert shapes.plan(5, 3) == (5, 8, 8)  # no shape set: each batch its own shape
    shapes.start([(1, 8), (1, 64)])
    assert shapes.pending
    assert shapes.plan(1, 3) == (1, 1, 8)  # its own shape (1 user, 8 rows) is ready
    assert shapes.plan(1, 20) == (1, 1, 64)  # 24 rows are not: padded up to 64
    assert shapes.plan(5, 3) == (1, 1, 8)  # 8 users are not: calls of one user
    shapes.mark_ready(32, 64)
    # 20 users: one call padded to 32 users (cost 34) beats 20 calls of one (cost 60)...
    assert shapes.plan(20, 30) == (20, 32, 64)
    # ...but 5 users cost less as calls of one (15) than padded to 32 (34).
    assert shapes.plan(5, 3) == (1, 1, 8)
    shapes.mark_ready(4, 64)
    assert shapes.plan(3, 3) == (3, 4, 64)  # 4 users ready at 64 rows: one call, padded
    assert shapes.plan(5, 30) == (4, 4, 64)  # two calls of 4 (12) beat 32 rows (34)
    assert shapes.plan(1, 70) == (1, 1, 128)  # longer than every warmed support: its own shape
    shapes.finish()
    assert not shapes.pending and shapes.plan(5, 30) == (4, 4, 64)  # the set stays the server's


@pytest.mark.parametrize("ready, expected_shape", [
    ([(1, 8), (2, 64)], (2, 2, 64)),  # split into calls of 2 users
    ([(1, 8), (16, 64)], (7, 16, 64)),  # one call, padded up to 16 users
])
def test_padded_and_split_batches_answer_like_one_call(learner, ready, expected_shape):
    served = ServingModel.from_learner(learner)
    jobs = jobs_of(served, 7, seed=3)
    expected = run_batch(served, jobs, None)
    served.shapes.start(ready)
    assert served.shapes.plan(7, 8) == expected_shape
    assert_same(run_batch(served, jobs, None), expected)
    keyed = jobs_of(served, 7, seed=3, cached=True)
    cache = AdaptedUserCache(10)
    run_batch(served, keyed[:3], cache)  # the cache path too: adapt the others, score all
    assert_same(run_batch(served, keyed, cache), expected)
    assert_same(run_batch(served, keyed, cache), expected)  # and every user cached


def test_check_then_warm_compile_every_shape_and_end_the_restriction(learner):
    served = ServingModel.from_learner(learner)
    make_check(batch_sizes=(1,), support_sizes=(3, 24), num_candidates=50, warm_up_follows=True)(served)
    assert served.shapes.pending and served.shapes.plan(4, 3) == (1, 1, 8)
    assert served.shapes.plan(1, 20) == (1, 1, 24) and served.shapes.plan(1, 12) == (1, 1, 24)
    make_warm(batch_sizes=(1, 2, 4), support_sizes=(8, 16, 24), num_candidates=50, low_priority=False)(served)
    assert all(served.shapes.is_ready(u, s) for u in (1, 2, 4) for s in (8, 16, 24))
    assert not served.shapes.pending and served.shapes.plan(4, 12) == (4, 4, 16)


def test_the_warm_up_compiles_the_longest_support_first_small_batches_first(learner):
    served = ServingModel.from_learner(learner)
    make_check(batch_sizes=(1,), support_sizes=(24,), num_candidates=50, warm_up_follows=True)(served)
    order = []
    mark = served.shapes.mark_ready
    served.shapes.mark_ready = lambda u, s: (order.append((u, s)), mark(u, s))
    make_warm(batch_sizes=(1, 2, 4, 8), support_sizes=(8, 24), num_candidates=50, low_priority=False)(served)
    assert order == [(2, 24), (4, 24), (8, 24), (1, 8), (2, 8), (4, 8), (8, 8)]


def test_a_support_padded_up_adapts_the_same_user(learner):
    # The padded rows are masked: adapting with 64 rows instead of 8 gives the same scores.
    rng = np.random.default_rng(5)
    items = rng.choice(np.arange(1, 301), size=6, replace=False).astype(np.int32)
    ratings = rng.integers(1, 6, 6).astype(np.float32)
    users, tight = learner.adapt_score_indices(items, ratings, [6], None)
    _, padded = learner.adapt_score_indices(items, ratings, [6], None, min_support_pad=64)
    np.testing.assert_allclose(padded[0], tight[0], rtol=1e-5, atol=1e-5)
    # So do the padded users of a call on more user rows, adapting or scoring.
    wide, padded = learner.adapt_score_indices(items, ratings, [6], None, min_users_pad=8)
    np.testing.assert_allclose(padded[0], tight[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(learner.score_indices(users, None, min_users_pad=8)[0], tight[0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(learner.score_indices(wide, None)[0], tight[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"min_support_pad must be an integer >= 0; got min_support_pad=-1"):
        learner.adapt_score_indices(items, ratings, [6], None, min_support_pad=-1)
    with pytest.raises(ValueError, match=r"min_users_pad must be an integer >= 0; got min_users_pad=2.5"):
        learner.score_indices(users, None, min_users_pad=2.5)
    with pytest.raises(ValueError, match=r"min_users_pad must be an integer >= 0; got min_users_pad=True"):
        learner.adapt_indices(items, ratings, [6], min_users_pad=True)


def test_short_gil_turns_last_while_any_warm_up_runs():
    default = sys.getswitchinterval()
    with short_gil_turns():
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        with short_gil_turns():  # a second model warming at the same time
            assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert sys.getswitchinterval() == default


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_the_warm_up_thread_alone_gets_the_lowest_priority():
    seen = {}

    def worker():
        lower_thread_priority()
        seen["worker"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["worker"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # the caller's is kept


def publish(model_dir, version, weight):
    (model_dir / str(version)).mkdir(parents=True)
    (model_dir / str(version) / "model.keras").write_text(json.dumps({"weight": weight}))


def json_loader(folder):
    return json.loads((folder / "model.keras").read_text())


def test_the_first_version_serves_before_its_warm_up_later_ones_after(tmp_path):
    seen = []

    def warm(model, stop):
        assert not stop.is_set()
        seen.append((model["weight"], registry.current.model["weight"] if registry.current else None))
        if model["weight"] < 0:
            raise ValueError("warm-up failed")

    registry = ModelRegistry("m", tmp_path, json_loader, warm=warm)
    publish(tmp_path, 1, 1)
    assert registry.poll()
    assert seen == [(1, 1)]  # warmed while already serving
    publish(tmp_path, 2, 2)
    assert registry.poll()
    assert seen[-1] == (2, 1)  # warmed while version 1 still served
    publish(tmp_path, 3, -3)
    assert not registry.poll()  # a later version whose warm-up fails is refused
    assert registry.current.version == 2
    assert "warm-up failed" in registry.refused[0].reason


def test_warming_the_first_version_before_it_serves_when_asked(tmp_path):
    seen = []

    def warm(model, stop):
        seen.append((model["weight"], registry.current.model["weight"] if registry.current else None))
        if model["weight"] < 0:
            raise ValueError("warm-up failed")

    registry = ModelRegistry("m", tmp_path, json_loader, warm=warm, warm_first_before_serving=True)
    publish(tmp_path, 1, -1)
    assert not registry.poll()  # its warm-up fails: refused, nothing serves
    assert registry.current is None and "warm-up failed" in registry.refused[0].reason
    publish(tmp_path, 2, 2)
    assert registry.poll()
    assert seen[-1] == (2, None)  # warmed while nothing served yet
    assert registry.current.version == 2


@pytest.mark.parametrize("serve_after_warm_up", [True, False])
def test_a_server_serves_after_its_warm_up_only_when_asked(learner, tmp_path, caplog, serve_after_warm_up):
    caplog.set_level(logging.DEBUG, logger="metarec_server")
    version = tmp_path / "models" / "1"
    version.mkdir(parents=True)
    learner.save(version / "model.keras")
    config = ServerConfig(model_dir=tmp_path / "models", port=0, log_path=tmp_path / "log.sqlite",
                          batching=BatcherConfig(max_batch_size=2), serve_after_warm_up=serve_after_warm_up)
    with BackgroundServer(config) as background:
        assert background.serving
        with Client(background.address, timeout=60) as client:
            items = [str(i) for i in learner.encoder.item_ids[1:6]]
            got = client.recommend(pd.DataFrame({"item_id": items, "rating": [5.0, 4.0, 3.0, 4.0, 5.0]}), k=3)
            assert len(got.item_ids) == 3
        registry = background.server.registries["default"]
        deadline = time.monotonic() + 120
        while registry.current.model.shapes.pending and time.monotonic() < deadline:
            time.sleep(0.1)
        served = registry.current.model
        assert all(served.shapes.is_ready(u, s) for u in (1, 2) for s in (16, 32, 64))
    messages = [record.getMessage() for record in caplog.records]
    serving = next(i for i, m in enumerate(messages) if "serving version 1" in m)
    compiled = [i for i, m in enumerate(messages) if m.startswith("warm-up:") and "compiled" in m]
    # 2 batch sizes x 3 supports, less the one-user shapes of the check (64 rows on TensorFlow,
    # 16 and 64 on JAX)
    checked = check_support_sizes(keras.backend.backend())
    assert len(compiled) == 6 - len(checked)
    assert not any(f"1 users x {size} support rows" in messages[i] for i in compiled for size in checked)
    if serve_after_warm_up:
        assert max(compiled) < serving  # every shape compiled before the version served
    else:
        assert min(compiled) > serving  # the version served first, then compiled the rest


def test_the_start_up_check_compiles_64_rows_on_tensorflow_16_and_64_on_jax():
    assert check_support_sizes("tensorflow") == (64,)
    assert check_support_sizes(None) == (64,)  # nothing chosen: Keras loads TensorFlow
    assert check_support_sizes("jax") == (16, 64)


def test_a_failed_warm_up_of_the_first_version_leaves_it_serving(tmp_path, caplog):
    def warm(model, stop):
        raise ValueError("warm-up failed")

    registry = ModelRegistry("m", tmp_path, json_loader, warm=warm)
    publish(tmp_path, 1, 1)
    assert registry.poll()
    assert registry.current.version == 1 and not registry.refused
    assert "warming version 1 up failed" in caplog.text


@pytest.mark.slow
def test_compilation_cache_keeps_compiled_programs_on_jax_only(tmp_path):
    program = textwrap.dedent(f"""
        import numpy as np
        from keras import ops
        from metarec import backend
        print(backend.enable_compilation_cache({str(tmp_path / "cache")!r}))
        f = backend.jit(lambda x: ops.sum(x * 2.0 + 1.0))
        print(float(backend.to_numpy(f(np.ones((8, 8), np.float32)))))
    """)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    enabled, value = out.stdout.split()[-2:]
    assert float(value) == 192.0
    files = list((tmp_path / "cache").rglob("*")) if (tmp_path / "cache").exists() else []
    if keras.backend.backend() == "jax":
        assert enabled == "True" and any(f.is_file() for f in files)
    else:
        assert enabled == "False" and not files


@pytest.mark.slow
def test_the_server_enables_its_compile_cache_on_the_first_load_not_before(tmp_path):
    # In a subprocess: the cache setting is process-wide. Keras is not imported until the first
    # version loads (so the port binds at once), then the cache is on for every program after.
    program = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from metarec_server.app import _with_compilation_cache

        def loader(folder):
            import numpy as np
            from keras import ops
            from metarec import backend
            f = backend.jit(lambda x: ops.sum(x * 3.0))
            return float(backend.to_numpy(f(np.ones((4, 4), np.float32))))

        load = _with_compilation_cache(loader, Path({str(tmp_path / "cache")!r}))
        print("keras" in sys.modules)
        print(load(Path(".")), load(Path(".")))
    """)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ), check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    before, first, second = out.stdout.split()[-3:]
    assert before == "False" and float(first) == float(second) == 48.0
    files = list((tmp_path / "cache").rglob("*")) if (tmp_path / "cache").exists() else []
    if keras.backend.backend() == "jax":
        assert any(f.is_file() for f in files)
    else:
        assert "keeps no compiled programs" in out.stderr and not files
