"""Catalogue-ranking baselines 6-9 (most popular, EASE^R, item-kNN, implicit ALS) and the
per-metric strongest baseline of the report."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from metarec.evaluation import EASE, ImplicitALS, ItemKNN, MostPopular, Report, UserQuery
from metarec.evaluation.protocol import METRIC_COLUMNS
from metarec.evaluation.ranking_baselines import als_fold_in

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"


class FakeTasks:
    """The part of a TaskSet the ranking baselines use: frame(), support / query frames, encoder."""

    def __init__(self, frame, items, supports=(), queries=(), feedback="explicit"):
        self._frame = pd.DataFrame(frame, columns=["user_id", "item_id", "rating"])
        self.supports = [pd.DataFrame(s, columns=["item_id", "rating"]) for s in supports]
        self.queries = [pd.DataFrame(q, columns=["item_id", "rating"]) for q in queries]
        self.encoder = SimpleNamespace(item_ids=np.array(["<oov>", *items], dtype=object),
                                       schema=SimpleNamespace(feedback=feedback))
        self.user_ids = np.arange(len(self.supports))

    def frame(self):
        return self._frame

    def support_frame(self, i):
        return self.supports[i]

    def query_frame(self, i):
        return self.queries[i]

    def __len__(self):
        return len(self.supports)


def rows_from_matrix(X, rating=5.0):
    return [(u, i, rating) for u, i in zip(*np.nonzero(X))]


def query(support_items, items, ratings=None):
    ratings = [5.0] * len(support_items) if ratings is None else ratings
    return UserQuery(pd.DataFrame({"item_id": support_items, "rating": ratings}), {}, np.asarray(items))


X5 = np.array([
    [1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0],
    [0, 1, 1, 1, 0],
    [0, 0, 1, 1, 1],
    [1, 0, 0, 1, 1],
    [1, 1, 0, 0, 1],
], dtype=float)


def test_ease_weights_have_zero_diagonal_and_equal_the_closed_form():
    train = FakeTasks(rows_from_matrix(X5), items=range(5))
    method = EASE(lambdas=(2.0,), matrices=("all-rated",)).fit(train)
    B = method.item_weights()
    P = np.linalg.inv(X5.T @ X5 + 2.0 * np.eye(5))
    expected = np.eye(5) - P / np.diag(P)[None, :]
    np.testing.assert_allclose(np.diag(B), 0.0, atol=1e-10)
    np.testing.assert_allclose(B, expected, atol=1e-10)
    # A user's scores are their support row times B.
    scores = method.predict_many([query([0, 2], range(5))])[0]
    np.testing.assert_allclose(scores, np.array([1, 0, 1, 0, 0.0]) @ expected, atol=1e-10)


def co_occurrence_data():
    """Item 0 always comes with item 1; item 9 is the most popular but never with item 0."""
    rows, user = [], 0
    for _ in range(6):
        rows += [(user, 0, 5.0), (user, 1, 5.0)]
        user += 1
    for u in range(20):
        rows += [(user, 9, 5.0), (user, 2 + u % 7, 5.0)]
        user += 1
    return FakeTasks(rows, items=range(10))


@pytest.mark.parametrize("method", [EASE(lambdas=(1.0,)), ItemKNN(neighbours=(3,)), ImplicitALS(
    grid=[{"factors": 4, "regularization": 0.1, "alpha": 5.0}], iterations=15)])
def test_fold_in_ranks_the_co_occurring_item_first(method):
    method.fit(co_occurrence_data())
    scores = method.predict_many([query([0], range(1, 10))])[0]
    assert np.argmax(scores) == 0  # item 1, not the popular item 9


def test_most_popular_ranks_by_meta_train_counts_for_everyone():
    method = MostPopular(matrices=("all-rated",)).fit(co_occurrence_data())
    counts = np.bincount(co_occurrence_data().frame()["item_id"], minlength=10)
    for support in ([0], [3, 4]):
        scores = method.predict_many([query(support, range(10))])[0]
        np.testing.assert_array_equal(scores, counts)
    assert method.get_params() == {"matrix": "all-rated"}


def test_als_fold_in_equals_a_direct_weighted_least_squares_solve():
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(12, 4))
    support = np.zeros(12)
    support[[1, 5, 7]] = 1.0
    reg, alpha = 0.3, 7.0
    x = als_fold_in(support[None, :], Y, reg, alpha)[0]
    # min sum_i c_i (p_i - y_i.x)^2 + reg |x|^2 with c = 1 + alpha p, as ordinary least squares.
    weights = np.sqrt(1.0 + alpha * support)
    design = np.vstack([weights[:, None] * Y, np.sqrt(reg) * np.eye(4)])
    target = np.concatenate([weights * support, np.zeros(4)])
    direct = np.linalg.lstsq(design, target, rcond=None)[0]
    np.testing.assert_allclose(x, direct, atol=1e-10)


def liked_only_data():
    """Under the all-rated matrix the disliked support item D (rated 1) pulls 25 filler items
    above the relevant target T; under the liked matrix only L -> T remains."""
    L, T, D = 0, 1, 2
    fillers = list(range(3, 28))
    rows, user = [], 0
    for _ in range(5):
        rows += [(user, L, 5.0), (user, T, 5.0)]
        user += 1
    for _ in range(3):
        rows += [(user, L, 5.0)]
        user += 1
    for _ in range(30):
        rows += [(user, D, 1.0)] + [(user, f, 2.0) for f in fillers]
        user += 1
    items = range(40)
    supports = [[(L, 5.0), (D, 1.0)]] * 4
    queries = [[(T, 5.0), (30, 2.0)]] * 4
    return (FakeTasks(rows, items), FakeTasks([], items, supports, queries))


@pytest.mark.parametrize("build", [MostPopular, lambda: EASE(lambdas=(1000.0,)), lambda: ItemKNN(neighbours=(50, None))])
def test_the_matrix_is_chosen_on_validation_users(build):
    train, val = liked_only_data()
    method = build().fit(train, val)
    assert method.get_params()["matrix"] == "liked"
    results = method.tuning_results_
    assert results[results["matrix"] == "liked"]["val_recall@20"].max() == 1.0
    assert results[results["matrix"] == "all-rated"]["val_recall@20"].max() == 0.0


def test_bad_input_raises_value_errors_that_quote_the_value():
    empty = FakeTasks([], items=range(3))
    with pytest.raises(ValueError, match="got an empty frame"):
        EASE().fit(empty)
    with pytest.raises(ValueError, match="got 0"):
        EASE(lambdas=(100.0, 0))
    with pytest.raises(ValueError, match="got -1.0"):
        EASE(lambdas=(-1.0,))
    with pytest.raises(ValueError, match="got 0"):
        ItemKNN(neighbours=(0,))
    with pytest.raises(ValueError, match="got 0"):
        ImplicitALS(grid=[{"factors": 0, "regularization": 1.0, "alpha": 1.0}])
    with pytest.raises(ValueError, match="got \\('rated',\\)"):
        MostPopular(matrices=("rated",))
    with pytest.raises(ValueError, match="call fit"):
        EASE().predict_many([query([0], [1])])


def test_ranking_baselines_report_no_mae_in_the_protocol():
    from metarec.datasets import synthetic
    from metarec.evaluation import Q1Protocol

    protocol = Q1Protocol(synthetic(seed=0), k_values=(10,))
    tasks = protocol.tasks(10)
    method = EASE().fit(tasks.train, tasks.val)
    frame = protocol.evaluate_method(method, "test", 10)
    assert frame["mae"].isna().all() and frame["rmse"].isna().all()
    assert frame["recall@20"].notna().any() and frame["ndcg@3"].notna().all()
    assert {"matrix", "lambda"} <= set(method.get_params())


def test_registry_adds_the_ranking_baselines_to_every_report():
    from metarec.evaluation.registry import GROUPS, build_methods

    assert GROUPS["ranking-baselines"] == ("most-popular", "ease", "item-knn", "implicit-als")
    assert set(GROUPS["ranking-baselines"]) <= set(GROUPS["baselines"])
    methods = build_methods("ranking-baselines", data=None)
    assert [type(m) for m in methods] == [MostPopular, EASE, ItemKNN, ImplicitALS]
    assert all(m.is_baseline and m.deterministic and not m.predicts_ratings for m in methods)


# --------------------------------------------------------------------------- report
def _frame(values, users=(1, 2, 3, 4, 5, 6)):
    rows = []
    for method, metrics in values.items():
        for i, user in enumerate(users):
            row = {"method": method, "k": 10, "seed": 0, "user_id": user}
            for metric in METRIC_COLUMNS:
                value = metrics.get(metric, np.nan)
                row[metric] = value + 0.01 * i if np.isfinite(value) else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def test_strongest_baseline_is_chosen_per_metric_on_validation_users():
    test = _frame({"item mean": {"mae": 0.80, "recall@20": 0.20, "ndcg@3": 0.70, "ndcg@20": 0.2},
                   "EASE": {"recall@20": 0.30, "ndcg@3": 0.60, "ndcg@20": 0.35},
                   "item-kNN": {"recall@20": 0.34, "ndcg@3": 0.60, "ndcg@20": 0.30},
                   "learner": {"mae": 0.79, "recall@20": 0.25, "ndcg@3": 0.65, "ndcg@20": 0.3}})
    val = _frame({"item mean": {"mae": 0.80, "recall@20": 0.20, "ndcg@3": 0.70, "ndcg@20": 0.2},
                  "EASE": {"recall@20": 0.36, "ndcg@3": 0.60, "ndcg@20": 0.35},
                  "item-kNN": {"recall@20": 0.33, "ndcg@3": 0.60, "ndcg@20": 0.30}})
    methods = ["item mean", "EASE", "item-kNN", "learner"]
    report = Report(test, methods, baselines=methods[:3], val_per_user=val)
    assert report.baseline_choice_split == "val"
    assert report.strongest_baselines() == {"mae": "item mean", "ndcg@3": "item mean",
                                            "recall@20": "EASE", "ndcg@20": "EASE"}
    tests = report.paired_tests(metric="recall@20")
    assert {name: t["reference"] for name, t in tests.items()} == {
        "item mean": "EASE", "item-kNN": "EASE", "learner": "EASE"}
    assert set(report.paired_tests(metric="mae")) == {"learner"}  # ranking baselines have no MAE
    markdown = report.to_markdown()
    assert "chosen on validation users" in markdown
    assert "p (MAE vs item mean)" in markdown and "p (Recall@20 (cat.) vs EASE)" in markdown
    # Without validation figures the choice falls back to test users, and says so.
    on_test = Report(test, methods, baselines=methods[:3])
    assert on_test.baseline_choice_split == "test"
    assert on_test.strongest_baseline(metric="recall@20") == "item-kNN"
    assert "chosen on test (the report has no validation figures) users" in on_test.to_markdown()


# --------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_ml100k_q1_k10_matches_the_independent_figures():
    if not ML100K.is_dir():
        pytest.skip(f"{ML100K} is not available")
    from metarec.datasets import load_movielens
    from metarec.evaluation import Q1Protocol

    protocol = Q1Protocol(load_movielens(ML100K), k_values=(10,))
    tasks = protocol.tasks(10)
    ease = EASE(matrices=("liked",)).fit(tasks.train, tasks.val)
    popular = MostPopular(matrices=("liked",)).fit(tasks.train, tasks.val)
    ease_recall = protocol.evaluate_method(ease, "test", 10)["recall@20"].mean()
    popular_recall = protocol.evaluate_method(popular, "test", 10)["recall@20"].mean()
    assert ease_recall == pytest.approx(0.338, abs=0.02)
    assert popular_recall == pytest.approx(0.311, abs=0.02)
