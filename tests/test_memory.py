"""The memory-based meta-learner as a user runs it: it reads the support set, adapts without
gradient steps, trains, saves, loads and serves through the same adapt / score API."""

import keras
import numpy as np
import pytest

import metarec
from metarec.memory import MemoryLearner


@pytest.fixture(scope="module")
def tasks(synthetic_tasks):
    return synthetic_tasks


def make(tasks, **kwargs):
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16, 16))
    learner = MemoryLearner(model, units=16, **kwargs)
    learner.compile(optimizer=keras.optimizers.Adam(3e-3))
    return learner


@pytest.fixture(scope="module")
def trained(tasks):
    learner = make(tasks)
    history = learner.fit(tasks.train, validation_data=tasks.val, epochs=6, verbose=0, seed=0)
    return learner, history


def support_of(tasks, user_index=0):
    return tasks.test.support_frame(user_index)[["item_id", "rating"]]


def test_untrained_reader_leaves_the_model_unchanged(tasks):
    # The conditioning heads start at zero: before training, "adapted" equals the plain model.
    learner = make(tasks)
    result = learner.evaluate(tasks.val, verbose=0)
    assert result["loss"] == pytest.approx(result["loss_before"], rel=1e-5)


def test_meta_training_reads_the_support_set(tasks, trained):
    learner, history = trained
    assert history.history["loss"][-1] < history.history["loss"][0]
    result = learner.evaluate(tasks.test, verbose=0)
    # Conditioning on the support set beats the same weights without it.
    assert result["loss"] < result["loss_before"] - 0.01


def test_adaptation_is_a_forward_pass_that_depends_on_the_interactions(tasks, trained):
    learner, _ = trained
    assert learner.inner_steps == 0
    support = support_of(tasks)
    items = tasks.encoder.item_ids[1:40]
    liked = support.assign(rating=5.0)
    disliked = support.assign(rating=1.0)
    a, b = learner.adapt_many([liked, disliked])
    assert np.mean(a.score(items)) > np.mean(b.score(items))
    # Vectorised adaptation agrees with one user at a time.
    np.testing.assert_allclose(a.score(items), learner.adapt(liked).score(items), rtol=1e-4, atol=1e-4)
    top = a.recommend(k=5)
    assert len(top) == 5 and not set(top["item_id"]) & set(support["item_id"])


def test_combination_with_gradient_steps(tasks, trained):
    learner, _ = trained
    support = support_of(tasks)
    items = tasks.encoder.item_ids[1:40]
    memory_only = learner.adapt(support).score(items)
    learner.inner_steps = 2
    try:
        stepped = learner.adapt(support).score(items)
        loss = learner.evaluate(tasks.val, verbose=0)["loss"]
    finally:
        learner.inner_steps = 0
    assert np.isfinite(loss)
    assert np.abs(stepped - memory_only).max() > 1e-4


@pytest.mark.parametrize("conditioning,cell", [("film", "gru"), ("concat", "gru"), ("film", "lstm")])
def test_save_load_round_trip(tasks, tmp_path, conditioning, cell):
    learner = make(tasks, conditioning=conditioning, inner_steps=1, cell=cell)
    recurrent = {"gru": keras.layers.GRU, "lstm": keras.layers.LSTM}[cell]
    assert isinstance(learner.support_reader.recurrent, recurrent)
    reader = {id(v) for v in learner.support_reader.recurrent.trainable_variables}
    assert reader and reader <= {id(v) for v in learner.meta_variables}
    learner.fit(tasks.train, epochs=1, verbose=0, seed=0)
    path = str(tmp_path / "memory.keras")
    learner.save(path)
    loaded = metarec.load(path)
    assert isinstance(loaded, MemoryLearner)
    assert (loaded.conditioning, loaded.units, loaded.inner_steps, loaded.cell) == (conditioning, 16, 1, cell)
    assert isinstance(loaded.support_reader.recurrent, recurrent)
    support = support_of(tasks)
    items = tasks.encoder.item_ids[1:30]
    np.testing.assert_allclose(loaded.adapt(support).score(items), learner.adapt(support).score(items),
                               rtol=1e-5, atol=1e-5)


def test_explicit_reader(tasks):
    encoder = tasks.encoder
    inputs = metarec.models.feature_inputs(encoder)
    parts = metarec.models.embed_features(encoder, inputs, 4)
    reader = keras.Model(inputs, keras.layers.Concatenate()(parts) if len(parts) > 1 else parts[0])
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(encoder, embedding_dim=8, hidden_units=(16,))
    learner = MemoryLearner(model, adapt="all", reader=reader, units=8)
    reader_ids = {id(v) for v in reader.trainable_variables}
    assert reader_ids <= {id(v) for v in learner.meta_variables}
    assert len(learner.meta_variables) == len({id(v) for v in learner.meta_variables})
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.fit(tasks.train, epochs=1, verbose=0)
    assert np.isfinite(learner.evaluate(tasks.val, verbose=0)["loss"])


def test_bad_settings(tasks):
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=4, hidden_units=(8,))
    with pytest.raises(ValueError, match="conditioning"):
        MemoryLearner(model, conditioning="attention")
    with pytest.raises(ValueError, match="units"):
        MemoryLearner(model, units=0)
    with pytest.raises(ValueError, match="got cell='transformer'"):
        MemoryLearner(model, cell="transformer")
    # Adapting the embeddings: the first adapted layer reads raw ids, so a reader is needed.
    with pytest.raises(ValueError, match="reader="):
        MemoryLearner(model, adapt="all")
