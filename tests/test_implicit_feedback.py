"""Implicit (0/1) feedback end to end: meta-train, evaluate, adapt, score and recommend.

The logistic branch of every path is checked against the log loss computed here from the
scores the SDK returns, so a wrong loss (or scores that are not probabilities) fails.
"""

import math

import keras
import numpy as np
import pytest

import metarec


@pytest.fixture(scope="module")
def trained():
    data = metarec.datasets.synthetic(num_users=300, num_items=200, feedback="implicit", seed=0)
    tasks = metarec.UserTasks(data, support_size=10)
    assert tasks.encoder.schema.feedback == "implicit"
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16,))
    learner = metarec.MAML(model, inner_steps=2, inner_lr=0.5)
    learner.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = learner.fit(tasks.train, validation_data=tasks.val, epochs=2, batch_size=32,
                          verbose=0, seed=0)
    return data, tasks, learner, history


def log_loss(labels, probs):
    probs = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)))


def test_fit_and_evaluate(trained):
    _, tasks, learner, history = trained
    assert learner.feedback == "implicit"
    assert np.all(np.isfinite(history.history["loss"])) and np.all(np.isfinite(history.history["val_loss"]))
    scores = learner.evaluate(tasks.test, verbose=0)
    assert np.isfinite(scores["loss"]) and np.isfinite(scores["loss_before"])
    assert scores["loss"] < scores["loss_before"]
    # Better than predicting 0.5 for every item (log loss ln 2).
    assert scores["loss"] < math.log(2.0)


def test_evaluate_is_the_log_loss_of_the_adapted_scores(trained):
    """evaluate's loss is each test user's mean log loss on their query after adaptation,
    averaged over users: recomputed here from adapt_many / score_many probabilities."""
    data, tasks, learner, _ = trained
    test = tasks.test
    supports = [test.support_frame(i)[["item_id", "rating"]] for i in range(len(test))]
    features = [data.users.loc[u].to_dict() for u in test.user_ids]
    queries = [test.query_frame(i) for i in range(len(test))]
    users = learner.adapt_many(supports, features)
    probs = learner.score_many(users, [q["item_id"].to_numpy() for q in queries])
    per_user = [log_loss(q["rating"].to_numpy(np.float64), p) for q, p in zip(queries, probs)]
    np.testing.assert_allclose(learner.evaluate(test, verbose=0)["loss"], np.mean(per_user), rtol=1e-4)


def test_adapt_score_recommend(trained):
    data, tasks, learner, _ = trained
    support = tasks.test.support_frame(0)[["item_id", "rating"]]
    assert set(np.unique(support["rating"])) <= {0.0, 1.0}
    features = data.users.loc[tasks.test.user_ids[0]].to_dict()
    user = learner.adapt(support, features)
    items = data.items.index.to_numpy()[:50]
    scores = user.score(items)
    assert scores.shape == (50,) and np.all((scores >= 0.0) & (scores <= 1.0))
    assert np.ptp(scores) > 0
    everything = user.score(None)
    assert np.all((everything >= 0.0) & (everything <= 1.0))
    # Adaptation moved the user's probabilities away from the meta-model's.
    assert not np.allclose(scores, learner.predict_items(items, features))
    recs = user.recommend(k=5)
    assert list(recs.columns) == ["item_id", "score"] and len(recs) == 5
    assert np.all(np.diff(recs["score"].to_numpy()) <= 0)
    assert np.all((recs["score"] >= 0.0) & (recs["score"] <= 1.0))
    assert not set(recs["item_id"]) & set(support["item_id"])


def test_explicit_ratings_are_refused(trained):
    _, tasks, learner, _ = trained
    support = tasks.test.support_frame(0)[["item_id", "rating"]].copy()
    support.loc[support.index[0], "rating"] = 3.0
    with pytest.raises(ValueError, match="needs a 0 or 1 label"):
        learner.adapt(support)
    with pytest.raises(ValueError, match="needs a 0 or 1 label"):
        learner.adapt_flat(support["item_id"].to_numpy(), support["rating"].to_numpy(), [len(support)])
