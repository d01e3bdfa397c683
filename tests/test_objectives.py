"""Switches of the meta-objective: the proximal inner term and the ranking-aware outer term."""

import keras
import numpy as np
import pytest

import metarec
from metarec import backend


@pytest.fixture(scope="module")
def tasks(synthetic_tasks):
    return synthetic_tasks


def make(tasks, **kwargs):
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16, 16))
    kwargs.setdefault("inner_lr", 0.2)
    learner = metarec.MAML(model, encoder=tasks.encoder, feedback="explicit", **kwargs)
    learner.compile(optimizer=keras.optimizers.Adam(3e-3))
    return learner


def drift(learner, support):
    """Distance of one user's adapted weights from the initialisation."""
    adapted = learner.adapt(support).weights
    start = [learner.model.trainable_variables[i].numpy() for i in learner.forward.adapt_index]
    return np.sqrt(sum(np.sum((a - s) ** 2) for a, s in zip(adapted, start)))


def test_proximal_term_keeps_adapted_weights_near_the_initialisation(tasks):
    support = tasks.test.support_frame(0)[["item_id", "rating"]]
    free = drift(make(tasks, inner_steps=10), support)
    held = drift(make(tasks, inner_steps=10, proximal=5.0), support)
    assert 0 < held < 0.8 * free
    # One step starts at the initialisation, where the pull is zero: no difference.
    one_free = drift(make(tasks, inner_steps=1), support)
    one_held = drift(make(tasks, inner_steps=1, proximal=5.0), support)
    assert one_held == pytest.approx(one_free, rel=1e-5)


def test_ranking_loss_equals_its_definition(tasks):
    learner = make(tasks, inner_steps=0, ranking_weight=1.0)
    episode = next(tasks.train.episodes(8, shuffle=False, max_query=16))
    params, non_trainable = learner.snapshot()
    after, ranking = (backend.to_numpy(t) for t in learner.ranked_query_losses(params, non_trainable, episode))
    item_keys = set(tasks.encoder.item_inputs(np.zeros(1, np.int32)))
    q = {k: np.asarray(v) for k, v in episode.query.items()}
    neg = {k: np.roll(v, 1, axis=0) if k in item_keys else v for k, v in q.items()}
    b, n = episode.query_y.shape
    flat = lambda x: {k: v.reshape((b * n,) + v.shape[2:]) for k, v in x.items()}  # noqa: E731
    pos_s = np.asarray(learner.model.predict(flat(q), verbose=0)).reshape(b, n)
    neg_s = np.asarray(learner.model.predict(flat(neg), verbose=0)).reshape(b, n)
    w = episode.query_mask * (episode.query_y >= 4) * np.roll(episode.query_mask, 1, axis=0)
    expected = (np.logaddexp(0, neg_s - pos_s) * w).sum(1) / np.maximum(w.sum(1), 1)
    np.testing.assert_allclose(ranking, expected, rtol=1e-4, atol=1e-5)
    assert (w.sum(1) > 0).sum() >= 4  # the check covers real pairs
    sq = ((pos_s - episode.query_y) ** 2 * episode.query_mask).sum(1) / np.maximum(episode.query_mask.sum(1), 1)
    np.testing.assert_allclose(after, sq, rtol=1e-4, atol=1e-5)


def test_ranking_objective_trains_and_is_saved(tasks, tmp_path):
    learner = make(tasks, inner_steps=1, ranking_weight=0.5)
    history = learner.fit(tasks.train, epochs=3, verbose=0, seed=0).history
    assert history["ranking_loss"][-1] < history["ranking_loss"][0]
    learner.save(tmp_path / "m.keras")
    loaded = metarec.load(tmp_path / "m.keras")
    assert (loaded.ranking_weight, loaded.relevance_threshold) == (0.5, 4.0)


@pytest.mark.parametrize("kwargs", [{"proximal": -1.0}, {"proximal": float("nan")}, {"ranking_weight": -0.1}])
def test_bad_objective_settings(tasks, kwargs):
    with pytest.raises(ValueError, match=list(kwargs)[0]):
        make(tasks, **kwargs)
