"""The runnable tutorials in examples/, at toy sizes: they must keep working as written."""

import os
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)


def test_linear_tasks_tutorial(tmp_path):
    import linear_tasks

    lines = []
    curves = linear_tasks.run(num_train=96, num_test=32, epochs=2, out=str(tmp_path), max_steps=2,
                              print_fn=lines.append)
    assert (tmp_path / "loss_vs_inner_steps.png").stat().st_size > 1000
    assert len(curves) == 10  # every family
    # Progress: a line when each method starts and finishes, and one per training epoch of
    # the nine that train by epochs (sequential fine-tuning makes one pass).
    starts = [line for line in lines if line.endswith("training on 96 tasks ...")]
    finishes = [line for line in lines if "query MSE" in line and " s in all)" in line]
    epochs = [line for line in lines if line.startswith("    epoch ")]
    assert len(starts) == len(finishes) == 10 and len(epochs) == 9 * 2, lines
    assert lines[0].startswith("[1/10] MAML (second order): training") and "epoch 2/2: loss " in lines[2]
    assert {"LSTM meta-learner (learned update)", "memory-based (LSTM, no steps)"} <= set(curves)
    for name, curve in curves.items():
        assert list(curve) == [0, 1, 2]
        assert all(np.isfinite(v) for v in curve.values()), name
    # Pre-training learns the average line; a gradient step on the support set then helps.
    pretrained = curves["pre-training + fine-tuning"]
    assert pretrained[2] < pretrained[0]


def test_linear_tasks_are_random_lines():
    import linear_tasks

    tasks = linear_tasks.make_tasks(50, seed=0, noise=0.0)
    x = np.concatenate([tasks.support_x["x"], tasks.query_x["x"]], axis=1)[..., 0]
    y = np.concatenate([tasks.support_y, tasks.query_y], axis=1)
    # Noise-free points of one task lie on one line: a least-squares fit is exact.
    for t in range(5):
        a, b = np.polyfit(x[t], y[t], 1)
        np.testing.assert_allclose(a * x[t] + b, y[t], atol=1e-4)
    assert len(tasks) == 50


def test_movielens_cold_start_tutorial(tmp_path):
    import movielens_cold_start as tutorial

    import metarec

    lines = []
    result = tutorial.run(data="synthetic", epochs=1, k=5, out=str(tmp_path), verbose=0,
                          print_fn=lines.append)
    tasks, learners = result["tasks"], result["learners"]
    assert set(learners) == {"MAML (MeLU, 1 step)", "memory-based (GRU)"}
    assert isinstance(learners["memory-based (GRU)"], metarec.MemoryLearner)
    # Every row of the test table is a finite number of the right scale (ratings 1..5).
    assert len(result["table"]) == 5
    for name, row in result["table"].items():
        assert 0 < row["mae"] < 2 and 0 < row["ndcg@10"] <= 1, name
        assert np.isfinite(row.get("loss", 0.0)), name
    assert any(line.startswith("| MAML (MeLU, 1 step), adapted |") for line in lines)

    # The cold-start user's top 5: distinct, unseen, best first, and truly the best 5 of the
    # unseen catalogue by the adapted user's own scores.
    support, top, user = result["support"], result["top"], result["user"]
    assert len(top) == 5 and top["item_id"].is_unique
    assert not set(top["item_id"]) & set(support["item_id"])
    catalogue = learners["MAML (MeLU, 1 step)"].encoder.item_ids[1:].astype(np.int64)
    scores = user.score()
    unseen = ~np.isin(catalogue, support["item_id"])
    np.testing.assert_allclose(top["score"], np.sort(scores[unseen])[::-1][:5], rtol=1e-6)

    # adapt_many + recommend_many: 5 distinct items per test user, none from their support.
    assert len(result["recommendations"]) == len(tasks.test)
    for i, (ids, item_scores) in enumerate(result["recommendations"]):
        assert len(ids) == 5 and len(set(ids.tolist())) == 5
        assert not set(ids.tolist()) & set(tasks.test.support_frame(i)["item_id"].tolist())
        assert np.all(np.diff(item_scores) <= 0)
    assert 0.0 <= result["hit_rate"] <= 1.0

    # Both saved learners load back and answer exactly as before saving.
    assert result["max_score_difference"] < 1e-6
    reloaded = metarec.load(result["saved"]).adapt(support, result["features"]).recommend(k=5)
    np.testing.assert_array_equal(reloaded["item_id"], top["item_id"])
    np.testing.assert_allclose(reloaded["score"], top["score"], rtol=1e-6)
    memory = metarec.load(tmp_path / "memory.keras")
    candidates = top["item_id"].to_numpy()
    np.testing.assert_allclose(
        memory.adapt(support, result["features"]).score(candidates),
        learners["memory-based (GRU)"].adapt(support, result["features"]).score(candidates),
        rtol=1e-6, atol=1e-6)


def test_grpc_client_tutorial(tmp_path):
    grpc = pytest.importorskip("grpc")
    import grpc_client as tutorial
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import metarec

    # The self-contained path: train, publish version 1, start the server as a subprocess,
    # run the tour, stop the server. A 1-user micro-batch keeps the server's warm-up short.
    result = tutorial.run(workdir=tmp_path, epochs=1, k=5, max_batch_size=1,
                          print_fn=lambda *args: None)
    assert result["health"] == "SERVING"
    status = result["status"][0]
    assert (status["state"], status["version"], status["num_items"]) == ("AVAILABLE", 1, 400)
    support, features = result["interactions"], result["user_features"]
    assert result["logged"] == len(support) == 10

    # The server's answers are the SDK's adapt + score of the same user.
    user = metarec.load(result["model_file"]).adapt(support[["item_id", "rating"]], features)
    expected = user.recommend(k=5)
    for recs in (result["recommend"], result["recommend_by_id"]):  # sent vs logged history
        assert recs.item_ids == expected["item_id"].tolist()
        np.testing.assert_allclose(recs.scores, expected["score"], rtol=1e-5, atol=1e-5)
        assert (recs.model_name, recs.model_version) == ("default", 1)
    assert len(set(result["recommend"].item_ids)) == 5
    assert not set(result["recommend"].item_ids) & set(support["item_id"])
    scored = result["score"]
    np.testing.assert_allclose(scored.scores, user.score(scored.item_ids), rtol=1e-5, atol=1e-5)

    errors = result["errors"]
    assert errors["unknown item"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-such-item" in errors["unknown item"][1]
    assert errors["version not served"][0] == grpc.StatusCode.NOT_FOUND
    assert errors["k beyond the limit"][0] == grpc.StatusCode.INVALID_ARGUMENT

    # The server was shut down: its port no longer answers.
    with grpc.insecure_channel(result["address"]) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "server stopped" in (tmp_path / "server.log").read_text()


def test_data_parallel_training_example(tmp_path):
    """One process: a mesh of every device this process sees (one, here); saves and loads."""
    import data_parallel_training
    import keras

    import metarec

    if keras.backend.backend() != "jax":
        with pytest.raises(ValueError, match="KERAS_BACKEND=jax"):
            data_parallel_training.run(epochs=1, batch_size=16, num_users=40, inner_steps=1)
        return
    path = tmp_path / "meta.keras"
    learner = data_parallel_training.run(epochs=1, batch_size=16, out=str(path), num_users=40,
                                             inner_steps=1)
    loaded = metarec.load(path)
    for a, b in zip(learner.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
