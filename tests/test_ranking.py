"""``metarec.ranking``: padding buckets, seen masks and top-k on tiny inputs, and the server's
Recommend path ranking exactly as ``AdaptedUser.recommend``."""

import numpy as np
import pytest

from metarec.ranking import (bucket, is_seen, mask_padding, mask_seen, mask_seen_lists, padded_users, support_bucket,
                             top_k)

INF = np.inf


def test_bucket_powers_of_two_then_multiples_of_1024():
    assert [bucket(n) for n in (0, 1, 2, 3, 5, 8, 9, 1000, 1024, 1025, 3000)] == \
        [1, 1, 2, 4, 8, 8, 16, 1024, 1024, 2048, 3072]
    assert bucket(3, minimum=8) == 8 and bucket(9, minimum=8) == 16


def test_padded_users_is_the_bucket_unless_asked_for_more_rows():
    assert padded_users(5) == 8
    assert padded_users(5, 32) == 32
    assert padded_users(20, 16) == 32  # never fewer rows than the users need
    for bad in (-1, 2.0, True, "8"):
        with pytest.raises(ValueError, match=f"min_users_pad must be an integer >= 0; got min_users_pad={bad!r}"):
            padded_users(3, bad)


def test_support_bucket_multiples_of_eight_up_to_64():
    assert [support_bucket(n) for n in (0, 1, 8, 9, 20, 64, 65, 200)] == [8, 8, 8, 16, 24, 64, 128, 256]


def test_top_k_orders_best_first_and_breaks_ties_by_column():
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0]])
    columns, values = top_k(scores, 3)
    assert columns[0].tolist() == [1, 2, 4] and values[0].tolist() == [3.0, 3.0, 3.0]
    assert columns[1].tolist() == [0, 1, 2]
    # A tie straddling the k-th place keeps the first columns of the tie.
    columns, _ = top_k(np.array([[5.0, 1.0, 2.0, 2.0, 2.0, 2.0]]), 3)
    assert columns[0].tolist() == [0, 2, 3]


def test_top_k_tie_rule_holds_on_random_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, (50, 40)).astype(np.float64)
    for k in (1, 5, 17, 40):
        columns, values = top_k(scores, k)
        for u in range(len(scores)):
            want = np.argsort(-scores[u], kind="stable")[:k]
            assert columns[u].tolist() == want.tolist()
            assert values[u].tolist() == scores[u, want].tolist()
            (one,), _ = top_k(scores[u : u + 1], k)  # a single row takes its own path
            assert one.tolist() == want.tolist()


def test_top_k_drops_padding_and_masked_columns_and_k_beyond_the_candidates():
    scores = np.array([[0.5, 0.1, 0.9, 0.7],
                       [0.2, 0.3, 0.0, 0.0]])
    mask_padding(scores, [4, 2])
    assert scores[1].tolist() == [0.2, 0.3, -INF, -INF]
    scores[0, 2] = -INF  # a seen item
    columns, values = top_k(scores, 10)
    assert columns[0].tolist() == [3, 0, 1] and values[0].tolist() == [0.7, 0.5, 0.1]
    assert columns[1].tolist() == [1, 0]
    columns, values = top_k(np.full((2, 3), -INF), 2)
    assert [c.tolist() for c in columns] == [[], []] and [v.size for v in values] == [0, 0]
    (one,), _ = top_k(np.array([[-INF, 0.3, -INF, 0.3]]), 3)
    assert one.tolist() == [1, 3]


def test_top_k_keeps_the_dtype():
    _, values = top_k(np.array([[1.0, 2.0]], np.float32), 1)
    assert values[0].dtype == np.float32


@pytest.mark.parametrize("users", [2, 20])  # user by user, and one hash index of the shared array
@pytest.mark.parametrize("kind", ["int", "str"])
def test_mask_seen_shared_candidates(users, kind):
    cands = np.array([10, 11, 12, 13])
    seen = [np.array([11, 99]), np.array([], np.int64)] * (users // 2)
    if kind == "str":
        cands = cands.astype(str).astype(object)
        seen = [s.astype(str).astype(object) for s in seen]
    scores = np.zeros((users, 6))
    mask_seen(scores, [cands] * users, seen)
    assert np.isneginf(scores[0]).tolist() == [False, True, False, False, False, False]
    assert not np.isneginf(scores[1]).any()


@pytest.mark.parametrize("users", [2, 20])  # user by user, and one isin over (user, index) pairs
def test_mask_seen_lists_per_user_integer_ids(users):
    catalogue = {10: 1, 11: 2, 12: 3, 13: 4}

    def item_index(ids):
        return np.array([catalogue.get(int(i), 0) for i in ids], np.int32)

    ids = [np.array([10, 11, 12]), np.array([13, 12, 77])] * (users // 2)
    seen = [np.array([12]), np.array([13, 77])] * (users // 2)
    index = [item_index(c) for c in ids]
    scores = np.zeros((users, 4))
    mask_seen_lists(scores, ids, index, seen, item_index, num_items=5)
    assert np.isneginf(scores[0]).tolist() == [False, False, True, False]
    # 77 is unknown to the catalogue (index 0): raw ids still tell it apart.
    assert np.isneginf(scores[1]).tolist() == [True, False, True, False]


def test_mask_seen_lists_string_ids():
    ids = [np.array(["a", "b"], object), np.array(["c"], object)]
    scores = np.zeros((2, 2))
    mask_seen_lists(scores, ids, [np.array([1, 2]), np.array([3])], [np.array(["b"], object), []],
                    lambda ids: np.zeros(len(ids), np.int32), num_items=4)
    assert np.isneginf(scores).tolist() == [[False, True], [False, False]]


def test_is_seen_matches_isin():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top = int(rng.integers(1, 500))
        idx = rng.integers(0, top + 10, int(rng.integers(1, 60))).astype(np.int32)
        seen = rng.integers(0, top + 10, int(rng.integers(1, 30))).astype(np.int32)
        np.testing.assert_array_equal(is_seen(idx, seen), np.isin(idx, seen))


# --------------------------------------------------------------------------- server == SDK
@pytest.fixture(scope="module")
def learner():
    metarec = pytest.importorskip("metarec")
    pytest.importorskip("keras")
    tasks = metarec.UserTasks(metarec.datasets.synthetic(seed=0), support_size=10)
    model = metarec.models.rating_mlp(tasks.encoder)
    return metarec.MAML(model, inner_steps=2, inner_lr=0.05, encoder=tasks.encoder)


@pytest.mark.parametrize("constant", [False, True])  # a constant model: every score ties
def test_server_recommend_ranks_as_adapted_user_recommend(learner, constant):
    import pandas as pd

    from server.inference import RECOMMEND, Job, ServingModel, run_batch

    saved = [v.numpy() for v in learner.model.variables]
    try:
        if constant:
            for v in learner.model.trainable_variables:
                v.assign(np.zeros(v.shape, v.dtype))
        served = ServingModel.from_learner(learner)
        raw = learner.encoder.item_ids[1:]
        support = pd.DataFrame({"item_id": raw[[3, 8, 20]], "rating": [5.0, 1.0, 4.0]})
        candidates = raw[[40, 8, 2, 30, 3, 11, 25, 7]]
        want = learner.adapt(support).recommend(k=5, candidates=candidates)
        job = Job(RECOMMEND, served.catalog.index([str(i) for i in support["item_id"]]),
                  support["rating"].to_numpy(np.float32), None, {},
                  served.catalog.index([str(i) for i in candidates]), 5, True, None)
        (got,) = run_batch(served, [job], None)
        assert served.catalog.raw(got.item_idx).tolist() == want["item_id"].tolist()
        np.testing.assert_allclose(got.scores, want["score"], rtol=1e-6, atol=1e-6)
        if constant:
            assert want["item_id"].tolist() == raw[[40, 2, 30, 11, 25]].tolist()
    finally:
        for v, value in zip(learner.model.variables, saved):
            v.assign(value)
