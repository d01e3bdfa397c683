"""The fast paths of ``metarec.runtime`` give the same results as the plain paths.

* ``score_many`` of exactly one ``adapt_many`` batch reuses its stacked device weights;
  any other list of users (a subset, another order, users with weights set by hand) stacks
  their numpy weights as before.
* User features are encoded once per distinct user and cached.
* Support frames are encoded in one call when their columns agree.
* Compiled kernels get tensor copies of the weights, read at every call.
"""

import keras
import numpy as np
import pandas as pd
import pytest

import metarec
from metarec.runtime import AdaptedUser, requests


@pytest.fixture(scope="module")
def setup():
    data = metarec.datasets.synthetic(num_users=120, num_items=150, seed=3)
    tasks = metarec.UserTasks(data, support_size=10)
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16,))
    learner = metarec.MAML(model, inner_steps=3, inner_lr=0.1, feedback="explicit",
                           encoder=tasks.encoder)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    users = []
    for i in range(5):
        support = tasks.train.support_frame(i)[["item_id", "rating"]]
        features = data.users.loc[tasks.train.user_ids[i]].to_dict()
        users.append((support, features))
    return data, tasks, learner, users


def plain_scores(learner, users, items):
    """The plain path: each user adapted alone, weights stacked from numpy."""
    out = []
    for support, features in users:
        u = learner.adapt_many([support], [features])[0]
        copy = AdaptedUser(learner, [np.array(w) for w in u.weights], u.user_inputs, u.seen_items)
        out.append(learner.score_many([copy], [items])[0])
    return out


def test_batch_scores_match_single_users(setup):
    data, _, learner, users = setup
    items = data.items.index.to_numpy()[:40]
    expected = plain_scores(learner, users, items)
    batch = learner.adapt_many([s for s, _ in users], [f for _, f in users])
    fast = learner.score_many(batch, [items] * len(users))  # the batch's device weights
    for e, f in zip(expected, fast):
        np.testing.assert_allclose(f, e, rtol=1e-5, atol=1e-5)
    # One list object for every user, or equal copies of it, take the shared-items kernel;
    # lists that differ take the per-user one: the same scores either way.
    copies = learner.score_many(batch, [items.copy() for _ in users])
    for e, f in zip(expected, copies):
        np.testing.assert_allclose(f, e, rtol=1e-5, atol=1e-5)
    assert requests.candidates(learner.encoder, [items.copy() for _ in users], len(users)).shared
    rolled = [np.roll(items, u) for u in range(len(users))]
    assert not requests.candidates(learner.encoder, rolled, len(users)).shared
    for u, f in enumerate(learner.score_many(batch, rolled)):
        np.testing.assert_allclose(f, np.roll(expected[u], u), rtol=1e-5, atol=1e-5)
    # A subset and another order take the numpy path and agree too.
    subset = learner.score_many(batch[::-1][:3], [items] * 3)
    for e, f in zip(expected[::-1][:3], subset):
        np.testing.assert_allclose(f, e, rtol=1e-5, atol=1e-5)


def test_weights_materialise_and_can_be_replaced(setup):
    data, _, learner, users = setup
    items = data.items.index.to_numpy()[:30]
    batch = learner.adapt_many([s for s, _ in users[:2]], [f for _, f in users[:2]])
    weights = batch[0].weights
    assert all(isinstance(w, np.ndarray) for w in weights)
    assert [w.shape for w in weights] == [
        tuple(learner.model.trainable_variables[i].shape) for i in learner.forward.adapt_index
    ]
    before = learner.score_many(batch, [items, items])
    # Weights set by hand are used (the batch's device copy no longer applies).
    batch[0].weights = [np.zeros_like(w) for w in weights]
    after = learner.score_many(batch, [items, items])
    assert not np.allclose(after[0], before[0])
    np.testing.assert_allclose(after[1], before[1], rtol=1e-5, atol=1e-5)


def test_recommend_many_matches_scores(setup):
    data, _, learner, users = setup
    batch = learner.adapt_many([s for s, _ in users], [f for _, f in users])
    recs = learner.recommend_many(batch, k=7)
    for user, (ids, scores) in zip(batch, recs):
        all_scores = user.score(None)
        catalogue = learner.encoder.item_ids[1:]
        keep = ~np.isin(catalogue, user.seen_items)
        order = np.argsort(-all_scores[keep].astype(np.float64), kind="stable")[:7]
        np.testing.assert_array_equal(ids, catalogue[keep][order])
        assert not set(ids) & set(user.seen_items)


def _brute_force_top_k(scores, ids, seen, k):
    keep = ~np.isin(ids, seen)
    order = np.argsort(-scores[keep].astype(np.float64), kind="stable")[:k]
    return ids[keep][order]


@pytest.mark.parametrize("kind", ["shared", "copies", "per_user", "duplicates", "mixed_types"])
def test_recommend_many_top_k_of_every_candidate_layout(setup, kind):
    """The vectorised top-k (one partition over the score matrix, seen items masked through
    one hash index) gives each user's brute-force top k, whatever the candidate lists."""
    data, _, learner, users = setup
    users = users * 4  # 20 users: many enough for the one-hash-index path
    batch = learner.adapt_many([s for s, _ in users], [f for _, f in users])
    items = data.items.index.to_numpy()[:60]
    # Make sure seen items are among the candidates, so that exclusion matters.
    items = np.unique(np.concatenate([items, np.concatenate([u.seen_items for u in batch])[:15]]))
    lists = {
        "shared": [items] * len(batch),
        "copies": [items.copy() for _ in batch],
        "per_user": [items[u:] for u in range(len(batch))],
        "duplicates": [np.concatenate([items, items[:5]])] * len(batch),
        "mixed_types": [items.astype(object)] * len(batch),
    }[kind]
    recs = learner.recommend_many(batch, k=9, candidates=lists)
    scores = learner.score_many(batch, lists)
    for u, (ids, top_scores) in enumerate(recs):
        cands = np.asarray(lists[u])
        want = _brute_force_top_k(scores[u], cands, batch[u].seen_items, 9)
        np.testing.assert_array_equal(np.sort(ids.astype(np.int64)), np.sort(want.astype(np.int64)))
        assert np.all(np.diff(top_scores) <= 0)
        assert not set(ids.tolist()) & set(batch[u].seen_items.tolist())
    # Without exclusion the seen items compete again, and k larger than the list keeps all.
    everything = learner.recommend_many(batch, k=10_000, exclude_seen=False, candidates=lists)
    for u, (ids, _) in enumerate(everything):
        assert len(ids) == len(lists[u])


def test_adapt_flat_matches_adapt_many(setup):
    data, _, learner, users = setup
    frames = [s for s, _ in users]
    features = [f for _, f in users]
    items = data.items.index.to_numpy()[:30]
    want = learner.score_many(learner.adapt_many(frames, features), [items] * len(frames))
    flat = learner.adapt_flat(
        np.concatenate([f["item_id"].to_numpy() for f in frames]),
        np.concatenate([f["rating"].to_numpy() for f in frames]),
        [len(f) for f in frames], features,
    )
    for f, u, w in zip(frames, flat, learner.score_many(flat, [items] * len(frames))):
        np.testing.assert_array_equal(u.seen_items, f["item_id"].to_numpy())
    for g, w in zip(learner.score_many(flat, [items] * len(frames)), want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lengths must be one integer >= 0 per user"):
        learner.adapt_flat([1, 2], [4.0, 5.0], [2, -1])
    # A user with no interactions yet is served by the meta-learned start.
    empty = pd.DataFrame({"item_id": np.array([], np.int64), "rating": np.array([], np.float64)})
    two = learner.adapt_flat([1, 2], [4.0, 5.0], [2, 0])
    np.testing.assert_allclose(learner.score_many(two[1:], [items])[0],
                               learner.adapt(empty).score(items), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sum\\(lengths\\) = 3"):
        learner.adapt_flat([1, 2], [4.0, 5.0], [1, 2])
    with pytest.raises(ValueError, match="rating must be finite"):
        learner.adapt_flat([1, 2], [4.0, np.nan], [1, 1])
    with pytest.raises(ValueError, match="user_features has 1 entries for 2 users"):
        learner.adapt_flat([1, 2], [4.0, 5.0], [1, 1], [{}])


def test_index_level_calls_match_the_raw_id_calls(setup):
    """adapt_indices / score_indices (the server's entry points, on encoded items) give the
    scores of adapt_many / score_many on raw ids."""
    data, _, learner, users = setup
    encoder = learner.encoder
    frames = [s for s, _ in users]
    features = [f for _, f in users]
    items = data.items.index.to_numpy()[:50]
    lists = [items[u:] for u in range(len(frames))]
    want = learner.score_many(learner.adapt_many(frames, features), lists)
    adapted = learner.adapt_indices(
        encoder.item_index(np.concatenate([f["item_id"].to_numpy() for f in frames])),
        np.concatenate([f["rating"].to_numpy() for f in frames]),
        [len(f) for f in frames], features,
    )
    for user, frame in zip(adapted, frames):  # seen items default to the raw ids
        np.testing.assert_array_equal(user.seen_items.astype(np.int64), frame["item_id"].to_numpy())
    got = learner.score_indices(adapted, [encoder.item_index(c) for c in lists])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    shared = learner.score_indices(adapted, encoder.item_index(items))  # one array for everyone
    for g, w in zip(shared, learner.score_many(adapted, [items] * len(frames))):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="item_index values must lie in"):
        learner.adapt_indices(np.array([1, encoder.num_items]), [4.0, 4.0], [2])
    with pytest.raises(ValueError, match="outside the rating range"):
        learner.adapt_indices(np.array([1, 2]), [4.0, 40.0], [2])
    with pytest.raises(ValueError, match="item_index has 1 entries for 5 users"):
        learner.score_indices(adapted, [encoder.item_index(items)])
    with pytest.raises(ValueError, match="item_index values must lie in"):
        learner.score_indices(adapted, np.array([1, encoder.num_items]))
    with pytest.raises(ValueError, match="must be a flat integer array"):
        learner.score_indices(adapted, [np.array([1.5, 2.0])] * len(adapted))
    with pytest.raises(ValueError, match="must hold sum\\(lengths\\) = 3"):
        learner.adapt_indices(np.array([1, 2]), [4.0, 4.0], [3])


def test_adapt_score_indices_is_adapt_then_score_in_one_call(setup):
    """The fused path (one compiled call) gives the two-call path's adapted users and scores,
    for per-user lists, one shared array and the whole catalogue."""
    data, _, learner, users = setup
    encoder = learner.encoder
    frames = [s for s, _ in users]
    features = [f for _, f in users]
    support = (encoder.item_index(np.concatenate([f["item_id"].to_numpy() for f in frames])),
               np.concatenate([f["rating"].to_numpy() for f in frames]),
               [len(f) for f in frames])
    items = data.items.index.to_numpy()[:50]
    two_call = learner.adapt_indices(*support, features)
    layouts = {
        "per-user": [encoder.item_index(items[u:]) for u in range(len(frames))],
        "shared": encoder.item_index(items),
        "catalogue": None,
    }
    for name, index in layouts.items():
        adapted, got = learner.adapt_score_indices(*support, index, features)
        want = (learner.score_many(two_call, None) if index is None
                else learner.score_indices(two_call, index))
        assert len(got) == len(want) == len(frames), name
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
        for a, b in zip(adapted, two_call):
            for wa, wb in zip(a.weights, b.weights):
                np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_array_equal(a.seen_items, b.seen_items)
    with pytest.raises(ValueError, match="item_index has 1 entries for 5 users"):
        learner.adapt_score_indices(*support, [encoder.item_index(items)], features)
    with pytest.raises(ValueError, match="item_index values must lie in"):
        learner.adapt_score_indices(*support, np.array([1, encoder.num_items]), features)
    with pytest.raises(ValueError, match="outside the rating range"):
        learner.adapt_score_indices(np.array([1, 2]), [4.0, 40.0], [2], np.array([3]))


def test_feature_cache_matches_encoder(setup):
    data, _, learner, _ = setup
    encoder = learner.encoder
    rows = [dict(data.users.iloc[i]) for i in range(10)]
    rows += [{}, {"segment": None}, {"age": 41.0}, {"age": 41}, {"segment": "unknown", "age": 200},
             {"user_id": 7, "segment": rows[0]["segment"]}]
    cache = requests.UserFeatureCache()
    for _ in range(2):  # cold, then cached
        got = cache.encode(encoder, rows)
        want = encoder.user_inputs_from_features([dict(r) for r in rows])
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # predict_items goes through the cache too.
    items = data.items.index.to_numpy()[:10]
    a = learner.predict_items(items, rows[0])
    b = learner.predict_items(items, rows[0])
    np.testing.assert_array_equal(a, b)


def test_batched_interaction_encoding_matches_per_frame(setup):
    _, _, learner, users = setup

    frames = [s for s, _ in users]
    frames.append(pd.DataFrame({"item_id": [1, 999999], "rating": [5.0, 1.0]}))  # unknown item
    got = requests.encode_interactions(learner.encoder, frames)
    want = [learner.encoder.encode_interactions(f) for f in frames]
    for (gi, gy), (wi, wy) in zip(got, want):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gy, wy)
    bad = frames[:2] + [pd.DataFrame({"item_id": [1], "rating": [9.0]})]
    with pytest.raises(ValueError, match="outside the rating range"):
        learner.adapt_many(bad)


@pytest.mark.parametrize("variant", ["int ratings", "extra and reordered columns", "string ids",
                                     "int and string ids", "float ids"])
def test_joined_encoding_of_unlike_frames_matches_per_frame(setup, variant, monkeypatch):
    """Frames are joined with pd.concat: whatever their columns and dtypes, the result and
    each user's raw ids equal encoding the frames one by one."""
    _, _, learner, users = setup

    frames = [s.reset_index(drop=True) for s, _ in users[:4]]
    if variant == "int ratings":
        frames[1] = frames[1].assign(rating=frames[1]["rating"].round().astype(int))
    elif variant == "extra and reordered columns":
        frames[0] = frames[0].assign(timestamp=np.arange(len(frames[0])))[["rating", "timestamp", "item_id"]]
    elif variant == "string ids":
        frames = [f.assign(item_id=f["item_id"].astype(str)) for f in frames]
    elif variant == "int and string ids":
        frames[2] = frames[2].assign(item_id=frames[2]["item_id"].astype(str))
    elif variant == "float ids":
        frames[3] = frames[3].assign(item_id=frames[3]["item_id"].astype(float))
    want = [learner.encoder.encode_interactions(f) for f in frames]
    calls = []
    encode = learner.encoder.encode_interactions
    monkeypatch.setattr(learner.encoder, "encode_interactions", lambda f: calls.append(len(f)) or encode(f))
    raw = []
    got = requests.encode_interactions(learner.encoder, frames, raw)
    # One joined call where the ids have one type; mixed id types go frame by frame.
    assert len(calls) == (len(frames) if variant in ("int and string ids", "float ids") else 1)
    for frame, (gi, gy), (wi, wy), r in zip(frames, got, want, raw, strict=True):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gy, wy)
        assert list(r) == list(frame["item_id"])


def test_joined_encoding_raises_the_frames_own_error(setup):
    _, _, learner, users = setup
    frames = [s for s, _ in users[:3]]
    with pytest.raises(ValueError) as joined:
        learner.adapt_many(frames + [pd.DataFrame({"item_id": [1, 2]})])  # no rating column
    with pytest.raises(ValueError) as alone:
        learner.adapt_many([pd.DataFrame({"item_id": [1, 2]})])
    assert str(joined.value) == str(alone.value)


def test_weights_read_at_every_call(setup):
    """Kernels get the variables' current values: changing the model changes the scores."""
    data, _, learner, users = setup
    items = data.items.index.to_numpy()[:20]
    support, features = users[0]
    before = learner.adapt(support, features).score(items)
    plain_before = learner.predict_items(items, features)
    var = learner.model.trainable_variables[-1]  # the output bias
    old = np.array(var.numpy())
    try:
        var.assign(old + 1.0)
        after = learner.adapt(support, features).score(items)
        plain_after = learner.predict_items(items, features)
    finally:
        var.assign(old)
    np.testing.assert_allclose(plain_after, plain_before + 1.0, rtol=1e-5, atol=1e-5)
    assert not np.allclose(after, before)


def test_per_user_lists_mask_seen_items_like_raw_ids(setup):
    """A different candidate list per user is masked in one pass over (user, item index) pairs;
    it excludes exactly what comparing raw ids user by user excludes: duplicates, ids unknown
    to the catalogue among the candidates and, for a user whose support held an unknown id,
    that same id among their candidates (unknown ids all share index 0, raw ids differ)."""
    data, _, learner, users = setup
    frames = [s for s, _ in users] * 4
    frames[0] = pd.concat([frames[0], pd.DataFrame({"item_id": [10**9], "rating": [3.0]})],
                          ignore_index=True)
    batch = learner.adapt_many(frames, [f for _, f in users] * 4)
    catalogue = data.items.index.to_numpy()
    rng = np.random.default_rng(7)
    lists = []
    for u, user in enumerate(batch):
        picks = rng.choice(catalogue, 40, replace=False)
        lists.append(np.concatenate([picks, user.seen_items[:3], picks[:2], [10**9, 10**9 + 1 + u]]))
    recs = learner.recommend_many(batch, k=10_000, candidates=lists)
    for u, (ids, _) in enumerate(recs):
        kept = np.asarray(lists[u])[~np.isin(lists[u], batch[u].seen_items)]
        np.testing.assert_array_equal(np.sort(ids), np.sort(kept))
    assert 10**9 not in recs[0][0] and 10**9 in recs[1][0]


@pytest.mark.parametrize("layout", ["catalogue", "shared", "per_user", "keep_seen"])
def test_adapt_recommend_many_is_adapt_then_recommend(setup, layout):
    """The one-call path gives what adapt_many + recommend_many give, for every candidate
    layout; the ranking (ties, seen items, padding) is the same code."""
    data, _, learner, users = setup
    supports, features = [s for s, _ in users] * 4, [f for _, f in users] * 4
    catalogue = data.items.index.to_numpy()
    seen = np.concatenate([s["item_id"].to_numpy() for s in supports])
    candidates = {
        "catalogue": None,
        "shared": [np.unique(np.concatenate([catalogue[:50], seen[:10]]))] * len(supports),
        "per_user": [np.concatenate([catalogue[u:u + 40], supports[u]["item_id"].to_numpy()[:2]])
                     for u in range(len(supports))],
        "keep_seen": [catalogue[:30]] * len(supports),
    }[layout]
    exclude = layout != "keep_seen"
    got = learner.adapt_recommend_many(supports, k=12, exclude_seen=exclude, candidates=candidates,
                                       user_features=features)
    want = learner.recommend_many(learner.adapt_many(supports, features), k=12, exclude_seen=exclude,
                                  candidates=candidates)
    assert len(got) == len(want) == len(supports)
    for (ids, scores), (want_ids, want_scores) in zip(got, want):
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    if exclude:
        assert all(not set(ids.tolist()) & set(s["item_id"].tolist()) for (ids, _), s in zip(got, supports))


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_adapt_recommend_many_rejects_bad_k(setup, k):
    _, _, learner, users = setup
    with pytest.raises(ValueError, match=r"k must be a positive integer; got k="):
        learner.adapt_recommend_many([users[0][0]], k=k)
    with pytest.raises(ValueError, match="supports is empty"):
        learner.adapt_recommend_many([], k=3)


def test_kernel_gathered_item_features_match_the_plain_forward_pass():
    """The score kernels gather item features (here a categorical, a multi-hot and numeric
    ones) from tables they are given; with no adaptation step their scores must equal the
    plain forward pass over features gathered on the host."""
    data = metarec.datasets.synthetic(num_users=60, num_items=80, seed=1)
    items = data.items.copy()
    items["studio"] = np.where(np.arange(len(items)) % 3 == 0, "north", "south")
    data = metarec.InteractionData(data.interactions, data.users, items)
    tasks = metarec.UserTasks(data, support_size=5)
    assert tasks.encoder.item_tables["studio"].dtype == np.int32
    keras.utils.set_random_seed(1)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=4, hidden_units=(8,))
    learner = metarec.MAML(model, inner_steps=0, encoder=tasks.encoder)
    support = tasks.train.support_frame(0)[["item_id", "rating"]]
    features = data.users.loc[tasks.train.user_ids[0]].to_dict()
    candidates = items.index.to_numpy()[::-1][:37]
    plain = learner.predict_items(candidates, features)
    for lists in ([candidates], [candidates, candidates[:20]]):
        users = learner.adapt_many([support] * len(lists), [features] * len(lists))
        scores = learner.score_many(users, lists)
        np.testing.assert_allclose(scores[0], plain, rtol=1e-5, atol=1e-5)
    ranked = learner.adapt_recommend_many([support], k=37, exclude_seen=False, candidates=[candidates],
                                          user_features=[features])[0]
    order = np.argsort(-plain.astype(np.float64), kind="stable")
    np.testing.assert_array_equal(ranked[0], candidates[order])


def test_adapt_recommend_many_rejects_bad_supports_and_candidates(setup):
    """The one-call path checks its inputs as adapt_many / recommend_many do, before any
    compiled work, and the learner keeps answering afterwards."""
    _, _, learner, users = setup
    support, features = users[0]
    nan = support.copy()
    nan.loc[nan.index[0], "rating"] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        learner.adapt_recommend_many([nan], k=3)
    with pytest.raises(ValueError, match="candidates has 1 entries for 2 users"):
        learner.adapt_recommend_many([support, support], k=3, candidates=[support["item_id"].to_numpy()])
    with pytest.raises(ValueError, match="user_features has 2 entries for 1 users"):
        learner.adapt_recommend_many([support], k=3, user_features=[features, features])
    with pytest.raises(ValueError, match="list of DataFrames"):
        learner.adapt_recommend_many(support, k=3)
    (ids, scores), = learner.adapt_recommend_many([support], k=3, user_features=[features])
    assert len(ids) == len(scores) == 3


def _adapt_outputs(learner, data, tasks, users):
    """Adapted weights, scores and adapt-and-score results of a few users, and the
    evaluation losses: every compiled path that reads the inner-loop settings."""
    items = data.items.index.to_numpy()[:25]
    supports, features = [s for s, _ in users[:3]], [f for _, f in users[:3]]
    adapted = learner.adapt_many(supports, features)
    index = learner.encoder.item_index(items)
    lengths = [len(s) for s in supports]
    flat = np.concatenate([learner.encoder.item_index(s["item_id"].to_numpy()) for s in supports])
    ratings = np.concatenate([s["rating"].to_numpy() for s in supports])
    _, one_call = learner.adapt_score_indices(flat, ratings, lengths, index, features)
    return {
        "weights": [np.concatenate([np.ravel(w) for w in u.weights]) for u in adapted],
        "scores": learner.score_many(adapted, [items] * 3),
        "one_call": one_call,
        "evaluate": [learner.evaluate(tasks.val, verbose=0)["loss"]],  # the adapted loss
    }


def _assert_outputs(got, expected, equal=True):
    for key in expected:
        for g, e in zip(got[key], expected[key]):
            if equal:
                np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=key)
            else:
                assert not np.allclose(g, e, rtol=1e-5, atol=1e-6), key


def test_changed_settings_take_effect_after_the_first_compiled_call(setup):
    """inner_lr and clipnorm are traced into the compiled kernels as constants: changing them
    on a learner that already adapted must give what a learner built with the new settings
    gives, on every path (adapt, score, adapt-and-score, evaluate)."""
    data, tasks, _, users = setup
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16,))

    def fresh(**settings):
        return metarec.MAML(model, inner_steps=3, feedback="explicit", encoder=tasks.encoder,
                            **settings)

    learner = fresh(inner_lr=0.1, clipnorm=5.0)
    old = _adapt_outputs(learner, data, tasks, users)
    learner.inner_lr = 0.3
    new_lr = _adapt_outputs(learner, data, tasks, users)
    _assert_outputs(new_lr, _adapt_outputs(fresh(inner_lr=0.3, clipnorm=5.0), data, tasks, users))
    _assert_outputs(new_lr, old, equal=False)
    learner.clipnorm = 0.01  # small enough to clip every step
    new_clip = _adapt_outputs(learner, data, tasks, users)
    _assert_outputs(new_clip, _adapt_outputs(fresh(inner_lr=0.3, clipnorm=0.01), data, tasks, users))
    _assert_outputs(new_clip, new_lr, equal=False)
    # And back: the first settings give the first results again.
    learner.inner_lr, learner.clipnorm = 0.1, 5.0
    _assert_outputs(_adapt_outputs(learner, data, tasks, users), old)


@pytest.mark.parametrize("setting,value", [
    ("inner_steps", 1), ("inner_lr", 0.5), ("clipnorm", None), ("proximal", 0.1),
    ("first_order", True), ("feedback", "implicit"),
])
def test_every_traced_setting_selects_its_own_kernel(setup, setting, value):
    """Each setting adapt_user reads as a constant keys the compiled-kernel cache (first_order
    changes only gradients, so no adapted value shows it: the kernel itself must differ)."""
    _, tasks, _, _ = setup
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=4, hidden_units=(8,))
    learner = metarec.MAML(model, inner_steps=2, inner_lr=0.1, feedback="explicit",
                           encoder=tasks.encoder)
    cache = learner.runtime.kernels
    kernel, evaluate_key = cache.adapt(learner), cache.key(learner, "evaluate")
    assert cache.adapt(learner) is kernel  # unchanged settings reuse the kernel
    setattr(learner, setting, value)
    assert cache.adapt(learner) is not kernel
    assert cache.key(learner, "evaluate") != evaluate_key  # evaluate's kernel is keyed alike


def test_memory_learner_conditioning_keys_its_kernels(setup):
    _, tasks, _, _ = setup
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=4, hidden_units=(8,))
    learner = metarec.MemoryLearner(model, units=4, feedback="explicit", encoder=tasks.encoder)
    cache = learner.runtime.kernels
    kernel = cache.adapt(learner)
    learner.inner_lr = 0.2
    assert cache.adapt(learner) is not kernel
    kernel = cache.adapt(learner)
    learner.conditioning = "concat"
    assert cache.adapt(learner) is not kernel
