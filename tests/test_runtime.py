"""The per-user runtime (``metarec.runtime``): its module-level programs against the learner's
own maths, the kernel cache, and the input forms of the ``Personalizer`` calls."""

import keras
import numpy as np
import pandas as pd
import pytest
from keras import ops

import metarec
from metarec import backend
from metarec.runtime import (AdaptedUser, EncodedCandidates, EncodedSupports, FlatSupports,
                             Personalizer, kernels, requests)


@pytest.fixture(scope="module")
def setup():
    data = metarec.datasets.synthetic(num_users=60, num_items=80, seed=5)
    tasks = metarec.UserTasks(data, support_size=6)
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=4, hidden_units=(8,))
    learner = metarec.MAML(model, inner_steps=2, inner_lr=0.1, feedback="explicit",
                           encoder=tasks.encoder)
    frames = [tasks.train.support_frame(i)[["item_id", "rating"]] for i in range(3)]
    features = [data.users.loc[tasks.train.user_ids[i]].to_dict() for i in range(3)]
    items = data.items.index.to_numpy()[:20]
    return data, learner, frames, features, items


def _tensors(tree):
    return keras.tree.map_structure(ops.convert_to_tensor, tree)


def _close(a, b, **kw):
    np.testing.assert_allclose(backend.to_numpy(a), backend.to_numpy(b), rtol=1e-5, atol=1e-5, **kw)


def test_adapt_program_is_adapt_user_of_each_user(setup):
    _, learner, frames, features, _ = setup
    batch = requests.support_batch(learner.encoder, requests.UserFeatureCache(), frames, features)
    params, non_trainable = learner.snapshot()
    inputs, target, mask = _tensors(batch.padded)
    stacked = kernels.adapt(learner, params, non_trainable, inputs, target, mask)
    for u in range(len(frames)):
        one = {k: v[u] for k, v in inputs.items()}
        want, _ = learner.adapt_user(params, non_trainable, one, target[u], mask[u])
        for got, w in zip(stacked, want):
            _close(got[u], w)
    # The compiled program, as the runtime runs it, gives the same weights.
    users = learner.runtime.adapt(frames, features)
    for u, user in enumerate(users):
        for got, w in zip(user.weights, stacked):
            _close(got, w[u])


def test_score_and_predict_programs_are_the_model_on_unadapted_weights(setup):
    _, learner, _, features, items = setup
    encoder, model = learner.encoder, learner.model
    params, non_trainable = learner.snapshot()
    initial = [ops.expand_dims(model.trainable_variables[i].value, 0) for i in learner.forward.adapt_index]
    user = encoder.user_inputs_from_features([features[0]])  # {name: [1, ...]}
    index = encoder.item_index(items)
    rows = encoder.item_inputs(index)
    rows.update({k: np.repeat(v, len(index), axis=0) for k, v in user.items()})
    want = model(rows, training=False)
    tables = _tensors(encoder.item_tables)
    for one_row in (False, True):
        spec = kernels.ScoreSpec(shared=True, one_row=one_row, head="rating")
        got = kernels.score(learner, spec, params, non_trainable, initial, _tensors(user),
                            ops.convert_to_tensor(index), tables)
        _close(got[0], np.reshape(backend.to_numpy(want), (-1,)))
    got = kernels.predict(learner, params, non_trainable, _tensors(rows))
    _close(got, np.reshape(backend.to_numpy(want), (-1,)))
    _close(learner.predict_items(items, features[0]), got)


def test_kernel_cache_recompiles_for_changed_settings(setup):
    _, learner, frames, features, items = setup
    cache = learner.runtime.kernels
    first = cache.adapt(learner)
    assert cache.adapt(learner) is first
    before = learner.runtime.score(learner.runtime.adapt(frames, features), [items] * 3)
    learner.inner_lr = 0.3
    try:
        assert cache.adapt(learner) is not first
        after = learner.runtime.score(learner.runtime.adapt(frames, features), [items] * 3)
    finally:
        learner.inner_lr = 0.1
    assert cache.adapt(learner) is first  # the first settings' program again
    assert not np.allclose(before[0], after[0])
    size = len(cache)
    learner.release_kernels()
    assert len(cache) == 0 < size


def test_every_support_form_adapts_alike(setup):
    _, learner, frames, features, items = setup
    runtime, encoder = learner.runtime, learner.encoder
    ids = np.concatenate([f["item_id"].to_numpy() for f in frames])
    ratings = np.concatenate([f["rating"].to_numpy() for f in frames])
    lengths = [len(f) for f in frames]
    forms = {
        "frames": runtime.adapt(frames, features),
        "flat": runtime.adapt(FlatSupports(ids, ratings, lengths), features),
        "encoded": runtime.adapt(EncodedSupports(encoder.item_index(ids), ratings, lengths), features),
    }
    one = runtime.adapt(frames[0], features[0])  # one DataFrame: one user
    assert isinstance(one, AdaptedUser)
    want = forms["frames"]
    for name, users in forms.items():
        assert len(users) == 3, name
        for got, w in zip(users, want):
            for a, b in zip(got.weights, w.weights):
                _close(a, b, err_msg=name)
            np.testing.assert_array_equal(np.asarray(got.seen_items, np.int64),
                                          np.asarray(w.seen_items, np.int64))
    for a, b in zip(one.weights, want[0].weights):
        _close(a, b)
    with pytest.raises(ValueError, match="lengths must be one integer >= 0 per user"):
        runtime.adapt(FlatSupports(ids[:2], ratings[:2], [2, -1]))
    with pytest.raises(ValueError, match="user_features has 1 entries for 3 users"):
        runtime.adapt(frames, features[:1])


def test_every_candidate_form_scores_alike(setup):
    _, learner, frames, features, items = setup
    runtime, encoder = learner.runtime, learner.encoder
    users = runtime.adapt(frames, features)
    lists = [items[u:] for u in range(3)]
    want = runtime.score(users, lists)
    encoded = runtime.score(users, EncodedCandidates([encoder.item_index(c) for c in lists]))
    for g, w in zip(encoded, want):
        _close(g, w)
    shared = runtime.score(users, [items] * 3)
    for g, w in zip(runtime.score(users, EncodedCandidates(encoder.item_index(items))), shared):
        _close(g, w)
    catalogue = runtime.score(users)
    for g, w in zip(runtime.score(users, EncodedCandidates(None)), catalogue):
        _close(g, w)
    assert len(catalogue[0]) == encoder.num_items - 1
    _close(runtime.score(users[1], lists[1]), want[1])  # one user: their array, one result
    _close(users[1].score(lists[1]), want[1])


def test_recommend_from_users_or_supports_alike(setup):
    _, learner, frames, features, items = setup
    runtime = learner.runtime
    lists = [np.concatenate([items, f["item_id"].to_numpy()[:2]]) for f in frames]
    from_users = runtime.recommend(runtime.adapt(frames, features), 5, candidates=lists)
    from_supports = runtime.recommend(frames, 5, candidates=lists, user_features=features)
    from_flat = runtime.recommend(
        FlatSupports(np.concatenate([f["item_id"].to_numpy() for f in frames]),
                     np.concatenate([f["rating"].to_numpy() for f in frames]),
                     [len(f) for f in frames]),
        5, candidates=lists, user_features=features)
    one = runtime.recommend(frames[0], 5, candidates=lists[0], user_features=features[0])
    for got in (from_supports, from_flat, [one] + from_users[1:]):
        for (ids, scores), (want_ids, want_scores) in zip(got, from_users):
            np.testing.assert_array_equal(ids, want_ids)
            _close(scores, want_scores)
    for (ids, _), frame in zip(from_users, frames):
        assert not set(ids.tolist()) & set(frame["item_id"].tolist())
    frame = runtime.adapt(frames[0], features[0]).recommend(5, candidates=lists[0])
    np.testing.assert_array_equal(frame["item_id"].to_numpy(), from_users[0][0])
    assert runtime.recommend([], 3) == []
    with pytest.raises(ValueError, match="k must be a positive integer"):
        runtime.recommend(frames, 0)


def test_adapt_and_score_is_adapt_then_score(setup):
    _, learner, frames, features, items = setup
    runtime = learner.runtime
    users, scores = runtime.adapt_and_score(frames, [items] * 3, features)
    for g, w in zip(scores, runtime.score(runtime.adapt(frames, features), [items] * 3)):
        _close(g, w)
    user, score = runtime.adapt_and_score(frames[0], items, features[0])
    _close(score, scores[0])
    _close(user.score(items), scores[0])
    with pytest.raises(ValueError, match="head must be"):
        runtime.adapt_and_score(frames, None, features, head="other")


def test_the_runtime_is_composed_not_tracked(setup):
    """The learner holds its Personalizer outside Keras's tracking: no weight is added, and
    the per-user calls are the runtime's."""
    _, learner, _, _, _ = setup
    assert isinstance(learner.runtime, Personalizer) and learner.runtime.learner is learner
    assert len(learner.weights) == len(learner.model.weights)
    assert not isinstance(learner, (AdaptedUser,)) and not any(
        "Mixin" in cls.__name__ for cls in type(learner).__mro__)


def test_request_checks(setup):
    _, learner, frames, _, _ = setup
    encoder = learner.encoder
    with pytest.raises(ValueError, match="list of DataFrames"):
        requests.frame_list(frames[0])
    with pytest.raises(ValueError, match="supports is empty"):
        requests.frame_list([])
    with pytest.raises(ValueError, match="item_index values must lie in"):
        requests.check_item_index([0, encoder.num_items], encoder.num_items)
    with pytest.raises(ValueError, match="candidates has 1 entries for 2 users"):
        requests.candidates(encoder, [np.array([1])], 2)
    cands = requests.candidates(encoder, [np.array([1, 2, 3])] * 2, 2)
    items, sizes = requests.item_batch(cands, 2)
    assert cands.shared and sizes == [3, 3] and items.shape == (8,)
    catalogue = requests.candidates(encoder, None, 2)
    items, _ = requests.item_batch(catalogue, 2)
    assert catalogue.catalogue and len(items) == encoder.num_items - 1  # never padded
    with pytest.raises(ValueError, match="has no feature encoder"):
        requests.require_encoder(None)
    assert isinstance(frames[0], pd.DataFrame)
