"""The catalogue objective and the two-tower model: the loss, what adaptation does to the
top-k list, the two heads, positives-only data, saving, and bad settings."""

import keras
import numpy as np
import pandas as pd
import pytest

import metarec
from metarec import backend
from metarec.catalogue_objective import CatalogueObjective
from metarec.sampling import NegativeSampler
from metarec.schema import infer_schema


def clustered_data(num_users=240, num_items=60, per_user=20, seed=0):
    """Two hidden kinds of users, each choosing (and liking) items of its own half of the
    catalogue. Nothing but a user's interactions tells the kinds apart, so only adaptation can
    rank the right half first."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, num_users + 1):
        half = rng.integers(0, 2)
        items = rng.choice(np.arange(1, num_items // 2 + 1), per_user, replace=False) + half * (num_items // 2)
        for t, item in enumerate(items):
            rows.append((user, int(item), float(rng.integers(3, 6)), user * 1000 + t))
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    users = pd.DataFrame({"age": rng.integers(18, 70, num_users)},
                         index=pd.Index(np.arange(1, num_users + 1), name="user_id"))
    return metarec.InteractionData(frame, users=users)


@pytest.fixture(scope="module")
def tasks():
    return metarec.UserTasks(clustered_data(), support_size=5, split="time", user_split="time")


def make(tasks, kind="catalogue", inner_steps=2, inner_lr=0.5, **objective):
    keras.utils.set_random_seed(0)
    model = metarec.models.two_tower(tasks.encoder, embedding_dim=16, feature_dim=8)
    learner = metarec.MAML(model, inner_steps=inner_steps, inner_lr=inner_lr, first_order=True,
                           objective=CatalogueObjective(NegativeSampler(kind, num_negatives=64), **objective))
    learner.compile(optimizer=keras.optimizers.Adam(1e-2))
    return learner


@pytest.fixture(scope="module")
def trained(tasks):
    learner = make(tasks)
    learner.fit(tasks.train, epochs=6, verbose=0, seed=0)
    return learner


def supports_of(taskset, n):
    return ([taskset.support_frame(i)[["item_id", "rating"]] for i in range(n)],
            [taskset.user_features(i) for i in range(n)])


def test_loss_equals_its_definition_on_the_full_catalogue(tasks):
    learner = make(tasks, rating_weight=0.3)
    learner.prepare(tasks.train)
    episode = next(tasks.train.episodes(2))
    negatives = learner.negative_inputs(learner.objective.sampler.inference_draw())
    params, non_trainable = learner.snapshot()
    adapted, fixed = learner.forward.split(learner.split_meta(params)[0])
    user = {k: v[0] for k, v in episode.support.items()}
    y, m = episode.support_y[0], episode.support_mask[0]
    loss = float(backend.to_numpy(learner.user_loss(adapted, fixed, non_trainable, user, y, m, negatives)))
    # The same by hand: ranking logits of every catalogue item for this user, with numpy.
    encoder = tasks.encoder
    catalogue = np.arange(1, encoder.num_items, dtype=np.int32)
    inputs = encoder.item_inputs(catalogue)
    for name in encoder.schema.user_features:
        inputs[name.name] = np.repeat(user[name.name][:1], len(catalogue), axis=0)
    out = learner.model(inputs)
    ranking = backend.to_numpy(out["ranking"]).ravel()
    rows = learner.model(user)
    rating = backend.to_numpy(rows["rating"]).ravel()
    liked = (m > 0) & (y >= 4)
    terms = [np.log(np.exp(ranking).sum()) - ranking[item - 1] for item in user["item_id"][liked]]
    expected = np.mean(terms) + 0.3 * np.sum(m * (rating - y) ** 2) / m.sum()
    assert liked.sum() > 0
    assert loss == pytest.approx(expected, rel=1e-4)


def test_adaptation_reorders_the_catalogue_and_helps(trained, tasks):
    supports, features = supports_of(tasks.test, len(tasks.test))
    adapted = trained.adapt_many(supports, features)
    after = trained.recommend_many(adapted, k=20)
    before_users = [metarec.AdaptedUser(trained, [w.numpy() if hasattr(w, "numpy") else np.asarray(w)
                                                  for w in trained.forward.split(
                                                      [v.value for v in trained.model.trainable_variables])[0]],
                                        u.user_inputs, u.seen_items) for u in adapted]
    before = trained.recommend_many(before_users, k=20)
    overlap = np.mean([len(set(a[0]) & set(b[0])) / 20 for a, b in zip(after, before)])
    assert overlap < 0.8  # adaptation changes the lists

    def recall(lists):
        hits = []
        for i, (ids, _) in enumerate(lists):
            liked = set(tasks.test.query_frame(i).query("rating >= 4")["item_id"])
            if liked:
                hits.append(len(set(ids) & liked) / min(len(liked), 20))
        return np.mean(hits)

    assert recall(after) > recall(before) + 0.1


def test_recommend_ranks_by_the_ranking_head_and_score_returns_ratings(trained, tasks):
    supports, features = supports_of(tasks.test, 2)
    user = trained.adapt(supports[0], features[0])
    items = tasks.encoder.item_ids[1:]
    ratings = user.score()
    ranking = trained.score_many([user], head="ranking")[0]
    assert trained.has_ranking_head()
    low, high = tasks.encoder.schema.rating_range
    assert ratings.min() > low - 2 and ratings.max() < high + 2
    assert not np.allclose(ratings, ranking)
    top = user.recommend(k=10, exclude_seen=False)
    np.testing.assert_array_equal(top["item_id"].to_numpy(), items[np.argsort(-ranking, kind="stable")[:10]])
    np.testing.assert_allclose(top["score"].to_numpy(), np.sort(ranking)[::-1][:10], rtol=1e-5)
    fused = trained.adapt_recommend_many(supports[:1], k=10, exclude_seen=False, user_features=features[:1])
    np.testing.assert_array_equal(fused[0][0], top["item_id"].to_numpy())


@pytest.mark.parametrize("kind", ["popularity", "in_batch", "uniform"])
def test_sampled_objectives_train(tasks, kind):
    learner = make(tasks, kind=kind, inner_steps=1)
    history = learner.fit(tasks.train, validation_data=tasks.val, epochs=2, verbose=0, seed=0)
    assert np.all(np.isfinite(history.history["val_loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_positives_only_implicit_data_needs_a_sampler():
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"user_id": rng.integers(0, 60, 1500), "item_id": rng.integers(0, 50, 1500)})
    rows = rows.drop_duplicates().assign(rating=1.0, timestamp=lambda f: np.arange(len(f)))
    schema = infer_schema(rows, feedback="implicit")
    data = metarec.InteractionData(rows, schema=schema)
    tasks = metarec.UserTasks(data, support_size=5, split="time", user_split="time")
    model = metarec.models.two_tower(tasks.encoder, embedding_dim=8, feature_dim=4)
    plain = metarec.MAML(model, inner_steps=1)
    plain.compile(optimizer=keras.optimizers.Adam(1e-2))
    with pytest.raises(ValueError, match="positives only.*NegativeSampler"):
        plain.fit(tasks.train, epochs=1, verbose=0)
    learner = metarec.MAML(model, inner_steps=1, inner_lr=0.5,
                           objective=CatalogueObjective(NegativeSampler("popularity", num_negatives=32)))
    learner.compile(optimizer=keras.optimizers.Adam(1e-2))
    learner.fit(tasks.train, epochs=1, verbose=0)
    top = learner.adapt(tasks.test.support_frame(0)[["item_id", "rating"]]).recommend(5)
    assert len(top) == 5 and np.all(np.isfinite(top["score"]))


def test_save_and_load_keep_the_objective_and_the_scores(trained, tasks, tmp_path):
    path = tmp_path / "two_tower.keras"
    trained.save(path)
    loaded = metarec.load(path)
    assert loaded.objective.get_config() == trained.objective.get_config()
    np.testing.assert_array_equal(loaded.objective.sampler.item_counts, trained.objective.sampler.item_counts)
    supports, features = supports_of(tasks.test, 3)
    a = trained.adapt_recommend_many(supports, k=10, user_features=features)
    b = loaded.adapt_recommend_many(supports, k=10, user_features=features)
    for (ia, sa), (ib, sb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trained.adapt(supports[0], features[0]).score([1, 2, 3]),
                               loaded.adapt(supports[0], features[0]).score([1, 2, 3]), rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"rating_weight": -1}, "rating_weight"),
    ({"rating_weight": float("nan")}, "rating_weight"),
    ({"positives": "rated"}, "positives='rated'"),
    ({"sampler": "catalogue"}, "sampler must be"),
    ({"relevance_threshold": None}, "relevance_threshold"),
    ({"inner_loss": "bpr"}, "inner_loss='bpr'"),
    ({"inner_positives": "some"}, "inner_positives='some'"),
    ({"start_weight": -1}, "start_weight"),
    ({"inner_rating_weights": ()}, r"got \(\)"),
    ({"inner_rating_weights": ((4, 1), (2, 0))}, "got rating 2.0 after 4.0"),
    ({"inner_rating_weights": ((2, float("nan")),)}, "got the value nan"),
    ({"inner_rating_weights": ((2, "1"),)}, "got the value '1'"),
    ({"inner_rating_weights": ((2, 0, 1),)}, r"got the knot \(2, 0, 1\)"),
    ({"inner_rating_weights": "2:0,4:1"}, "got '2:0,4:1'"),
    ({"inner_rating_weights": ((2, 0), (4, 1)), "inner_positives": "all"}, "pass one of them"),
])
def test_bad_objective_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CatalogueObjective(**kwargs)


def test_bad_learner_and_model_settings_are_refused(tasks):
    model = metarec.models.two_tower(tasks.encoder, embedding_dim=4, feature_dim=4)
    with pytest.raises(ValueError, match="objective must be"):
        metarec.MAML(model, objective="catalogue")
    with pytest.raises(ValueError, match="ranking_weight"):
        metarec.MAML(model, objective=CatalogueObjective(), ranking_weight=0.5)
    with pytest.raises(ValueError, match="embedding_dim=0"):
        metarec.models.two_tower(tasks.encoder, embedding_dim=0)
    with pytest.raises(ValueError, match="item_prior"):
        metarec.models.two_tower(tasks.encoder, item_prior=np.zeros(3))
    with pytest.raises(ValueError, match="head='top'"):
        metarec.MAML(model).score_many([], head="top")


def test_start_weight_trains_the_unadapted_start_too(tasks):
    plain = make(tasks, inner_steps=1)
    weighted = make(tasks, inner_steps=1, start_weight=1.0)
    plain.prepare(tasks.train)
    weighted.prepare(tasks.train)
    episode = next(tasks.train.episodes(8))
    batch = plain.train_batch(episode, 0)
    params, non_trainable = plain.snapshot()
    logs0, _ = plain.meta_gradients(params, non_trainable, batch)
    logs1, _ = weighted.meta_gradients(params, non_trainable, batch)
    before, after = plain.user_query_losses(params, non_trainable, episode, negatives=batch[1])
    assert float(backend.to_numpy(logs0["loss"])) == pytest.approx(float(backend.to_numpy(logs1["loss"])), rel=1e-5)
    weight = np.asarray(episode.query_mask).sum(axis=1) > 0
    assert float(backend.to_numpy(logs1["start_loss"])) == pytest.approx(
        float(np.asarray(backend.to_numpy(before))[weight].mean()), rel=1e-4)


def test_inner_rating_weights_follow_the_knots_on_every_backend():
    from metarec.catalogue_objective import piecewise_linear

    ratings = np.array([0.5, 1, 2, 2.5, 3, 4, 5, 6], dtype="float32")
    got = backend.to_numpy(piecewise_linear(keras.ops.convert_to_tensor(ratings), ((2, 0), (4, 1))))
    np.testing.assert_allclose(got, [0, 0, 0, 0.25, 0.5, 1, 1, 1])
    got = backend.to_numpy(piecewise_linear(keras.ops.convert_to_tensor(ratings), ((1, -1), (3, 0), (5, 2))))
    np.testing.assert_allclose(got, [-1, -1, -0.5, -0.25, 0, 1, 2, 2])
    assert backend.to_numpy(piecewise_linear(keras.ops.convert_to_tensor(ratings), ((3, 0.7),))).tolist() == \
        pytest.approx([0.7] * len(ratings))


def _ranking_after(learner, tasks, support):
    learner.prepare(tasks.train)  # the encoder, as fit would set it
    features = tasks.test.user_features(0)
    top = learner.adapt(support, features).recommend(k=60, exclude_seen=False)
    return top.set_index("item_id")["score"].sort_index()


def test_inner_rating_weights_decide_how_far_each_support_item_moves_the_list(tasks):
    """The linear inner step moves the user vector by each support item's weight: weight 0
    leaves the list as it was, a negative weight pushes the item (and its neighbours) down."""
    knots = ((3, -1.0), (4, 0.0), (5, 1.0))  # the data's ratings run from 3 to 5
    weighted = make(tasks, inner_steps=1, inner_loss="linear", rating_weight=0.0, inner_rating_weights=knots)
    plain = make(tasks, inner_steps=1, inner_loss="linear", rating_weight=0.0, inner_positives="all")
    item = int(tasks.test.support_frame(0)["item_id"].iloc[0])
    scores = {}
    for rating in (3.0, 4.0, 5.0):
        support = pd.DataFrame({"item_id": [item], "rating": [rating]})
        scores[rating] = (_ranking_after(weighted, tasks, support), _ranking_after(plain, tasks, support))
    disliked, neutral, liked = (scores[r][0] for r in (3.0, 4.0, 5.0))
    assert disliked[item] < neutral[item] < liked[item]
    # weight 0: exactly the unadapted list, which a different 4-star item gives as well
    other = int(tasks.test.support_frame(0)["item_id"].iloc[1])
    neutral_other = _ranking_after(weighted, tasks, pd.DataFrame({"item_id": [other], "rating": [4.0]}))
    np.testing.assert_allclose(neutral.to_numpy(), neutral_other.to_numpy(), rtol=1e-6, atol=1e-6)
    # without the knots every rated item counts alike
    np.testing.assert_allclose(scores[3.0][1].to_numpy(), scores[5.0][1].to_numpy(), rtol=1e-6, atol=1e-6)


def test_inner_rating_weights_are_saved_with_the_learner(tasks, tmp_path):
    knots = ((2, 0), (4, 1))
    learner = make(tasks, inner_steps=1, inner_loss="linear", inner_rating_weights=knots)
    assert CatalogueObjective.from_config(learner.objective.get_config()).inner_rating_weights == \
        ((2.0, 0.0), (4.0, 1.0))
    learner.save(tmp_path / "weighted.keras")
    loaded = metarec.load(tmp_path / "weighted.keras")
    assert loaded.objective.inner_rating_weights == ((2.0, 0.0), (4.0, 1.0))
    support = tasks.test.support_frame(0)[["item_id", "rating"]]
    np.testing.assert_allclose(_ranking_after(learner, tasks, support).to_numpy(),
                               _ranking_after(loaded, tasks, support).to_numpy(), rtol=1e-5, atol=1e-6)
