"""The catalogue statistics a two-tower model starts from, the preset built on them, and the
implicit-feedback reading of MovieLens (protocol Q2-implicit)."""

from pathlib import Path

import numpy as np
import pytest

import metarec
from metarec.priors import cooccurrence_embeddings, log_popularity

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="module")
def tasks(synthetic_tasks):
    return synthetic_tasks


def liked_cooccurrence(tasks):
    frame = tasks.train.frame()
    frame = frame[frame["rating"] >= 4]
    enc = tasks.encoder
    x = np.zeros((frame["user_id"].nunique(), enc.num_items))
    users = {u: i for i, u in enumerate(frame["user_id"].unique())}
    x[[users[u] for u in frame["user_id"]], enc.item_index(frame["item_id"].to_numpy())] = 1.0
    return x.T @ x


def test_full_rank_embeddings_reproduce_the_cooccurrence(tasks):
    c = liked_cooccurrence(tasks)
    n = tasks.encoder.num_items
    e = cooccurrence_embeddings(tasks, n, scale=1.0).astype(np.float64)
    # Scaled to a longest row of 1: inner products are the counts up to one factor.
    gram = e @ e.T
    factor = gram[1:, 1:].max() / c[1:, 1:].max()
    np.testing.assert_allclose(gram[1:, 1:], factor * c[1:, 1:], atol=1e-3 * gram.max())
    assert np.all(e[0] == 0)
    assert np.linalg.norm(e, axis=1).max() == pytest.approx(1.0, rel=1e-5)


def test_low_rank_and_cosine_parts(tasks):
    e = cooccurrence_embeddings(tasks, 12, scale=3.0, cosine_dim=4, cosine_scale=5.0)
    assert e.shape == (tasks.encoder.num_items, 12)
    assert np.linalg.norm(e[:, :8], axis=1).max() == pytest.approx(3.0, rel=1e-5)
    assert np.linalg.norm(e[:, 8:], axis=1).max() == pytest.approx(5.0, rel=1e-5)


def test_log_popularity_orders_items_by_liked_count(tasks):
    prior = log_popularity(tasks)
    counts = np.diag(liked_cooccurrence(tasks))
    real = np.arange(1, tasks.encoder.num_items)
    assert np.all(np.diff(prior[real][np.argsort(counts[real], kind="stable")]) >= -1e-6)
    assert prior[real].mean() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"dim": 0}, "dim=0"), ({"dim": 10 ** 6}, "dim=1000000"), ({"dim": 4, "cosine_dim": 4}, "cosine_dim=4"),
    ({"dim": 4, "scale": 0}, "scale=0"), ({"dim": 4, "relevance_threshold": 99.0}, "no liked interaction"),
])
def test_bad_settings_are_refused(tasks, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cooccurrence_embeddings(tasks, **kwargs)
    with pytest.raises(ValueError, match="UserTasks or TaskSet"):
        log_popularity("tasks")


def test_the_preset_weighs_support_ratings_by_the_ramp_and_refuses_an_unknown_name(tasks):
    assert tasks.encoder.schema.feedback == "explicit"
    learner = metarec.presets.catalogue_two_tower(tasks, embedding_dim=16, cosine_dim=4,
                                                  relevance_threshold=3.5)
    assert learner.objective.inner_rating_weights == ((1.5, 0.0), (3.5, 1.0))
    with pytest.raises(ValueError, match="\"ramp\", None or .*got 'Ramp'"):
        metarec.presets.catalogue_two_tower(tasks, inner_rating_weights="Ramp")


def test_the_preset_starts_as_most_popular_and_adapts_only_the_user_offsets(tasks):
    learner = metarec.presets.catalogue_two_tower(tasks, embedding_dim=16, cosine_dim=4)
    adapted = [learner.model.trainable_variables[i].path for i in learner.forward.adapt_index]
    assert adapted == ["decision_user_vector/bias", "decision_user_rating_vector/bias"]
    rates = [float(np.asarray(r.value)) for r in learner.inner_lr_weights]
    assert rates == pytest.approx([1.0, 0.01])
    # Before any adaptation (and before any training), the ranking is by liked popularity.
    import pandas as pd

    empty = pd.DataFrame({"item_id": np.array([], np.int64), "rating": np.array([], np.float64)})
    top = learner.adapt(empty).recommend(k=10)["item_id"].to_numpy()
    prior = log_popularity(tasks)
    want = tasks.encoder.item_ids[1:][np.argsort(-prior[1:], kind="stable")[:10]]
    assert set(top) == set(want)


@pytest.mark.skipif(not ML100K.exists(), reason="MovieLens-100K is not available")
def test_movielens_as_implicit_feedback():
    data = metarec.datasets.load_movielens(ML100K, feedback="implicit")
    assert data.feedback == "implicit"
    assert set(data.interactions["rating"].unique()) == {1.0}
    assert len(data.interactions) == 100_000
    with pytest.raises(ValueError, match="feedback='binary'"):
        metarec.datasets.load_movielens(ML100K, feedback="binary")


def test_readme_catalogue_snippet_runs():
    import re
    import textwrap

    import keras

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", readme, re.S)]
    presets = next(b for b in blocks if "presets.residual_maml(" in b)
    catalogue = next(b for b in blocks if "presets.catalogue_two_tower(tasks)" in b)
    keras.utils.set_random_seed(0)
    namespace = {}
    exec(compile(presets + catalogue, "README.md", "exec"), namespace)
    assert namespace["learner"].has_ranking_head()
    assert len(namespace["user"].recommend(k=20)) == 20
