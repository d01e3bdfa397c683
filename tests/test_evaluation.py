"""Protocol Q1, the mean baselines and the report, end to end on real and synthetic data."""

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metarec.datasets import load_movielens, synthetic
from metarec.evaluation import (
    METRIC_COLUMNS,
    GlobalMean,
    ItemMean,
    ItemMeanUserOffset,
    Method,
    Q1Protocol,
    UserQuery,
    mae,
    queries_from_tasks,
    run_evaluation,
)

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ML100K = DATA_ROOT / "ml-100k"


@pytest.fixture(scope="module")
def data():
    return synthetic(seed=0)


@pytest.fixture(scope="module")
def protocol(data):
    return Q1Protocol(data)


def expected_split(interactions, fractions=(0.7, 0.1, 0.2), min_count=30):
    """Q1's user split computed independently of metarec.tasks."""
    first = interactions.groupby("user_id")["timestamp"].min().reset_index()
    order = first.sort_values(["timestamp", "user_id"], kind="stable")["user_id"].to_numpy()
    n_train = int(round(fractions[0] * len(order)))
    n_val = int(round(fractions[1] * len(order)))
    counts = interactions.groupby("user_id").size()
    eligible = lambda users: [u for u in users if counts[u] >= min_count]  # noqa: E731
    return (order[:n_train], eligible(order[n_train:n_train + n_val]), eligible(order[n_train + n_val:]))


# ----------------------------------------------------------------------------- the split
def test_split_follows_q1_and_is_deterministic(data, protocol):
    train, val, test = expected_split(data.interactions)
    assert sorted(protocol.tasks(10).train.user_ids.tolist()) == sorted(train.tolist())
    assert protocol.user_ids("val").tolist() == sorted(val)
    assert protocol.user_ids("test").tolist() == sorted(test)
    again = Q1Protocol(synthetic(seed=0))
    for split in ("val", "test"):
        assert again.user_ids(split).tolist() == protocol.user_ids(split).tolist()
        for k in protocol.k_values:
            first, second = again.queries(split, k), protocol.queries(split, k)
            for a, b in zip(first, second):
                pd.testing.assert_frame_equal(a.support, b.support)
                np.testing.assert_array_equal(a.item_ids, b.item_ids)


def test_support_is_the_first_k_interactions_and_query_the_rest(data, protocol):
    user = protocol.user_ids("test")[0]
    history = data.interactions[data.interactions["user_id"] == user].sort_values(["timestamp", "item_id"])
    for k in protocol.k_values:
        tasks = protocol.tasks(k).test
        i = tasks.user_ids.tolist().index(user)
        assert tasks.support_frame(i)["item_id"].tolist() == history["item_id"].tolist()[:k]
        assert tasks.query_frame(i)["item_id"].tolist() == history["item_id"].tolist()[k:]


def test_training_sees_nothing_of_validation_or_test_users(data, protocol):
    held_out = set(protocol.user_ids("val").tolist()) | set(protocol.user_ids("test").tolist())
    for k in protocol.k_values:
        train = protocol.tasks(k).train
        assert not held_out & set(train.user_ids.tolist())
        assert not held_out & set(train.frame()["user_id"].tolist())
        # Meta-train users contribute *all* their ratings.
        expected = data.interactions[data.interactions["user_id"].isin(train.user_ids)]
        assert len(train.frame()) == len(expected)


def test_verify_raises_when_a_held_out_user_leaks_into_training(data):
    broken = Q1Protocol(data, k_values=(10,))
    broken.tasks(10).train = broken.tasks(10).test  # deliberately leak the test users
    with pytest.raises(RuntimeError, match="both meta-train and validation/test"):
        broken.verify()


def test_same_evaluation_users_at_every_k(protocol):
    for split in ("val", "test"):
        ids = [getattr(protocol.tasks(k), split).user_ids.tolist() for k in protocol.k_values]
        assert all(i == ids[0] for i in ids)


def test_protocol_rejects_bad_arguments(data):
    with pytest.raises(ValueError, match="20"):
        Q1Protocol(data, k_values=(5, 20), eval_min_interactions=20)
    with pytest.raises(ValueError, match=r"\(0,\)"):
        Q1Protocol(data, k_values=(0,))


# ----------------------------------------------------------------------------- baselines
def test_baselines_predict_their_formulas(protocol):
    tasks = protocol.tasks(10)
    frame = tasks.train.frame()
    g = frame["rating"].mean()
    stats = frame.groupby("item_id")["rating"].agg(["sum", "count"])
    item = stats.index[0]
    query = UserQuery(tasks.test.support_frame(0), {}, np.array([item, -12345]))

    assert GlobalMean().fit(tasks.train).predict_many([query])[0].tolist() == pytest.approx([g, g])
    damped = (stats.loc[item, "sum"] + 3 * g) / (stats.loc[item, "count"] + 3)
    item_mean = ItemMean(damping=3, damping_grid=None).fit(tasks.train)
    assert item_mean.predict_many([query])[0].tolist() == pytest.approx([damped, g])  # unknown → g

    offset_model = ItemMeanUserOffset(3, 7, None, None).fit(tasks.train)
    support = query.support
    item_part = [(stats.loc[i, "sum"] + 3 * g) / (stats.loc[i, "count"] + 3) if i in stats.index else g
                 for i in support["item_id"]]
    offset = (support["rating"] - item_part).sum() / (len(support) + 7)
    assert offset_model.predict_many([query])[0].tolist() == pytest.approx([damped + offset, g + offset])


def test_tuning_uses_validation_users_only(protocol):
    tasks = protocol.tasks(10)
    grid = (0.0, 5.0, 50.0)
    method = ItemMean(damping_grid=grid).fit(tasks.train, tasks.val)
    # Recompute validation MAE for every grid point independently.
    frame = tasks.train.frame()
    g = frame["rating"].mean()
    stats = frame.groupby("item_id")["rating"].agg(["sum", "count"])
    expected = []
    for damping in grid:
        per_user = []
        for i in range(len(tasks.val)):
            query = tasks.val.query_frame(i)
            s = stats.reindex(query["item_id"]).fillna(0)
            pred = np.where(s["count"] + damping > 0, (s["sum"] + damping * g) / (s["count"] + damping), g)
            per_user.append(np.abs(np.clip(pred, 1, 5) - query["rating"].to_numpy()).mean())
        expected.append(np.mean(per_user))
    assert method.tuning_results_["val_mae"].tolist() == pytest.approx(expected)
    assert method.get_params() == {"damping": grid[int(np.argmin(expected))]}


class RecordingMethod(Method):
    """A real method (global mean plus seeded noise) that records what fit receives."""

    name = "recording"

    def __init__(self):
        self.calls = []

    def fit(self, train_tasks, val_tasks=None, seed=0):
        self.calls.append((set(train_tasks.user_ids.tolist()), set(val_tasks.user_ids.tolist()), seed))
        self.mean = train_tasks.frame()["rating"].mean()
        self.rng = np.random.default_rng(seed)
        return self

    def predict_many(self, users):
        return [self.mean + self.rng.normal(scale=0.1, size=len(u.item_ids)) for u in users]


def test_run_evaluation_fits_on_train_tunes_on_val_and_never_sees_test(protocol):
    recorder = RecordingMethod()
    baseline = GlobalMean()
    report = run_evaluation(protocol, [recorder, baseline], seeds=(0, 1), k_values=(10,), progress=False)
    test_users = set(protocol.user_ids("test").tolist())
    assert [seed for _, _, seed in recorder.calls] == [0, 1]
    for train_users, val_users, _ in recorder.calls:
        assert val_users == set(protocol.user_ids("val").tolist())
        assert not (train_users | val_users) & test_users
    # The deterministic baseline runs once; the seeded method once per seed.
    counts = report.per_user.groupby("method")["seed"].nunique()
    assert counts.to_dict() == {"global mean": 1, "recording": 2}


def test_queries_from_tasks_hide_the_query_ratings(protocol):
    queries, truths = queries_from_tasks(protocol.tasks(5).val)
    assert len(queries) == len(truths) == len(protocol.user_ids("val"))
    assert all(len(q.support) == 5 and len(q.item_ids) == len(t) for q, t in zip(queries, truths))


def test_evaluate_method_scores_each_user_over_catalogue_and_query(data, protocol):
    method = ItemMean(damping=5, damping_grid=None).fit(protocol.tasks(10).train)
    frame = protocol.evaluate_method(method, "test", 10)
    assert frame["user_id"].tolist() == protocol.user_ids("test").tolist()
    columns = list(METRIC_COLUMNS) + ["recall@20_unadapted", "overlap@20"]
    assert list(frame.columns[-len(columns):]) == columns
    catalogue_size = data.interactions["item_id"].nunique()
    assert (frame["n_candidates"] == catalogue_size - 10).all()
    # One user's MAE by hand.
    user_query = protocol.tasks(10).test.query_frame(0)
    prediction = method.predict_many([UserQuery(None, {}, user_query["item_id"].to_numpy())])[0]
    assert frame.loc[0, "mae"] == pytest.approx(mae(user_query["rating"], prediction, (1, 5)))
    assert frame.loc[0, "n_relevant"] == int((user_query["rating"] >= 4).sum())
    assert frame[list(METRIC_COLUMNS)].notna().all().all()


def test_evaluate_method_rejects_wrong_prediction_shapes(protocol):
    class Broken(GlobalMean):
        def predict_many(self, users):
            return [np.zeros(3) for _ in users]

    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        protocol.evaluate_method(Broken().fit(protocol.tasks(10).train), "val", 10)


# ----------------------------------------------------------------------------- report
def test_report_end_to_end_on_synthetic_data(protocol, tmp_path):
    started = time.perf_counter()
    methods = [GlobalMean(), ItemMean(), ItemMeanUserOffset(), RecordingMethod()]
    report = run_evaluation(protocol, methods, seeds=(0, 1, 2), progress=False)
    report.set_inner_step_curves({"recording": {0: 0.95, 1: 0.9, 5: 0.85}})
    paths = report.save(tmp_path)
    assert time.perf_counter() - started < 30

    n_test = len(protocol.user_ids("test"))
    assert len(report.per_user) == n_test * 3 * (3 + 3)  # 3 K × (3 one-seed baselines + 3 seeds)
    summary = report.summary()
    seeded = summary[(summary["method"] == "recording") & (summary["k"] == 10)].iloc[0]
    assert seeded["seeds"] == 3 and seeded["mae_std"] > 0
    assert report.strongest_baseline() in {"item mean", "item mean + user offset"}

    markdown = paths["markdown"].read_text()
    assert "## K = 10 (headline)" in markdown
    assert f"p (MAE vs {report.strongest_baseline()})" in markdown
    assert "| global mean |" in markdown
    stored = json.loads(paths["json"].read_text())
    assert len(stored["per_user"]) == len(report.per_user)
    assert stored["paired_tests"]["10"]["mae"]["global mean"]["p_value"] < 0.05  # far worse than item mean
    assert stored["strongest_baselines_chosen_on"] == "val"
    assert "chosen on validation users" in markdown
    assert stored["inner_step_curves"] == {"recording": {"0": 0.95, "1": 0.9, "5": 0.85}}
    for name in ("mae_vs_k", "headline_bars", "mae_vs_inner_steps"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_evaluation_rejects_duplicate_names_and_unknown_k(protocol):
    with pytest.raises(ValueError, match="unique"):
        run_evaluation(protocol, [GlobalMean(), GlobalMean()], progress=False)
    with pytest.raises(ValueError, match="7"):
        run_evaluation(protocol, [GlobalMean()], k_values=(7,), progress=False)


# ----------------------------------------------------------------------------- MovieLens-100K
@pytest.mark.skipif(not ML100K.is_dir(), reason=f"{ML100K} is not available")
def test_q1_on_movielens_100k_matches_the_orientation_figures():
    protocol = Q1Protocol(load_movielens(ML100K))
    assert len(protocol.user_ids("test")) == 130
    tasks = protocol.tasks(10)
    frame = protocol.evaluate_method(ItemMean().fit(tasks.train, tasks.val), "test", 10)
    assert len(frame) == 130
    assert frame["mae"].mean() == pytest.approx(0.832, abs=0.01)
    global_mae = protocol.evaluate_method(GlobalMean().fit(tasks.train), "test", 10)["mae"].mean()
    assert global_mae == pytest.approx(0.958, abs=0.01)


# ----------------------------------------------------------------------------- learners
def test_learner_method_plugs_a_meta_learner_into_the_evaluation(data):
    import keras

    import metarec
    from metarec.evaluation import LearnerMethod

    def build(train_tasks, seed):
        keras.utils.set_random_seed(seed)
        model = metarec.models.rating_mlp(train_tasks.encoder, embedding_dim=4, hidden_units=(8,))
        learner = metarec.MAML(model, inner_steps=1, inner_lr=0.05)
        learner.compile(optimizer=keras.optimizers.Adam(1e-2))
        return learner

    protocol = Q1Protocol(data, k_values=(10,))
    method = LearnerMethod("maml", build, {"epochs": 1, "batch_size": 128}, batch_users=40)
    method.fit(protocol.tasks(10).train, protocol.tasks(10).val, seed=0)
    queries = protocol.queries("test", 10)
    predictions = method.predict_many(queries)  # 98 users in three chunks of <= 40
    assert [len(p) for p in predictions] == [len(q.item_ids) for q in queries]
    frame = protocol.evaluate_method(method, "test", 10)
    assert frame["mae"].between(0, 4).all()
    assert np.std(predictions[0]) > 0  # item-dependent, not a constant


# ----------------------------------------------------------------------------- two heads
class _TwoHeads(Method):
    """Ratings from the item mean; ranking scores and an "unadapted" ranking given by hand:
    the catalogue is ranked by ``rank_many``, the diagnostic compares it with the unadapted
    ranking."""

    name = "two heads"

    def __init__(self, favourite):
        self.favourite = favourite  # item ranked first after "adaptation"
        self.means = ItemMean(damping_grid=None)

    def fit(self, train_tasks, val_tasks=None, seed=0):
        self.means.fit(train_tasks, None, seed)
        return self

    def predict_many(self, users):
        return self.means.predict_many(users)

    def rank_many(self, users):
        return [np.where(u.item_ids == self.favourite, 10.0, -np.arange(len(u.item_ids), dtype=float))
                for u in users]

    def unadapted_rank_many(self, users):
        return [-np.arange(len(u.item_ids), dtype=float) for u in users]


def test_a_ranking_head_ranks_the_catalogue_and_the_diagnostic_compares_it(protocol, tmp_path):
    users = protocol.eval_users("test", 10)
    liked = users[0].relevant[0]
    method = _TwoHeads(liked).fit(protocol.tasks(10).train)
    frame = protocol.evaluate_method(method, "test", 10)
    plain = protocol.evaluate_method(method.means, "test", 10)
    # MAE and the graded nDCG come from the ratings, the catalogue metrics from rank_many.
    np.testing.assert_allclose(frame["mae"], plain["mae"])
    np.testing.assert_allclose(frame["ndcg@3"], plain["ndcg@3"])
    # Ranked in catalogue order, with the favourite first: the top 20 keeps 19 of the 20.
    first = frame.iloc[0]
    assert first["overlap@20"] == pytest.approx(19 / 20 if liked not in users[0].query.item_ids[:20] else 1.0)
    assert first["recall@20"] >= first["recall@20_unadapted"]
    assert plain["overlap@20"].isna().all()  # a method that does not adapt has no diagnostic
    report = run_evaluation(protocol, [method.means, method], seeds=(0,), k_values=(10,), progress=False)
    diagnostic = report.personalization()
    assert diagnostic["method"].tolist() == ["two heads"]
    row = diagnostic.iloc[0]
    assert row["gain"] == pytest.approx(row["recall@20"] - row["recall@20_unadapted"])
    assert "## Personalization at K = 10" in report.to_markdown()
    saved = report.save(tmp_path)
    assert saved["recall_vs_k"].exists()
    assert json.loads(saved["json"].read_text())["personalization"]["10"][0]["method"] == "two heads"
