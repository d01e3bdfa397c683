"""The LSTM meta-learner as a user runs it: its rule before meta-training, meta-training,
adapt / score, saving, score-batch and the server's batch path, and bad settings.
(Its meta-gradients are checked in tests/test_meta_gradients.py.)"""

import keras
import numpy as np
import pandas as pd
import pytest

import metarec
from metarec.batch_scoring import score_batch
from metarec.learned_optimizer import LSTMMetaLearner, preprocess


@pytest.fixture(scope="module")
def data_and_tasks():
    data = metarec.datasets.synthetic(num_users=120, num_items=80, seed=3)
    return data, metarec.UserTasks(data, support_size=10)


def make(tasks, adapt="decision_layers", **kwargs):
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16,))
    kwargs.setdefault("inner_steps", 2)
    kwargs.setdefault("inner_lr", 0.05)
    learner = LSTMMetaLearner(model, adapt=adapt, hidden_size=8, feedback="explicit",
                              encoder=tasks.encoder, **kwargs)
    learner.compile(optimizer=keras.optimizers.Adam(3e-3))
    return learner


@pytest.fixture(scope="module")
def trained(data_and_tasks):
    _, tasks = data_and_tasks
    learner = make(tasks)
    before = learner.evaluate(tasks.train, verbose=0)["loss"]
    history = learner.fit(tasks.train, epochs=3, verbose=0, seed=0)
    return learner, before, history


def one_user(tasks):
    ep = tasks.train.episode_for(np.arange(1), max_query=8, seed=0)
    return {k: v[0] for k, v in ep.support.items()}, ep.support_y[0], ep.support_mask[0]


def gradient_step(learner, tasks, lr):
    """Adapted weights after one plain gradient step of rate ``lr`` (MAML on the same model),
    and the start."""
    maml = metarec.MAML(learner.model, inner_steps=1, inner_lr=lr, adapt=learner.adapt_spec,
                        clipnorm=None, feedback="explicit")
    params, non_trainable = maml.snapshot()
    adapted, _ = maml.adapt_user(params, non_trainable, *one_user(tasks))
    start, _ = maml.forward.split(params)
    return [np.asarray(a) for a in adapted], [np.asarray(w) for w in start]


def test_preprocessing_reads_log_magnitude_and_sign():
    features = np.asarray(preprocess(np.array([-2.0, 1e-3, 0.0, 1e-6])))
    np.testing.assert_allclose(features[:, 0], [np.log(2.0) / 10, np.log(1e-3) / 10, -1.0, -1.0], rtol=1e-6)
    np.testing.assert_allclose(features[:, 1], [-1.0, 1.0, 0.0, 1e-6 * np.exp(10)], rtol=1e-5)


@pytest.mark.parametrize("form", ["andrychowicz", "ravi_larochelle"])
def test_untrained_rule_is_its_documented_start(data_and_tasks, form):
    # Before meta-training, the andrychowicz rule is sign descent at step inner_lr; the
    # ravi_larochelle rule is gradient descent at rate inner_lr with decay sigmoid(5).
    _, tasks = data_and_tasks
    learner = make(tasks, form=form, inner_steps=1, clipnorm=None)
    params, non_trainable = learner.snapshot()
    adapted, _ = learner.adapt_user(params, non_trainable, *one_user(tasks))
    stepped, start = gradient_step(learner, tasks, 0.05)
    for a, w0, w1 in zip(adapted, start, stepped):
        grad = (w0 - w1) / 0.05
        a = np.asarray(a)
        if form == "andrychowicz":
            # Where |g| > 1.5 e^-10 the step is exactly -inner_lr * sign(g); below, the sign
            # feature is e^10 g, which a gradient read back from float32 weights cannot pin down.
            signed = np.abs(grad) * np.exp(10.0) > 1.5
            assert signed.mean() > 0.5
            np.testing.assert_allclose(a[signed], (w0 - 0.05 * np.sign(grad))[signed], rtol=1e-5, atol=1e-6)
            assert np.all(np.abs(a - w0) <= 0.05 + 1e-6)
        else:
            expected = w0 / (1.0 + np.exp(-5.0)) - 0.05 * grad
            np.testing.assert_allclose(a, expected, rtol=1e-4, atol=1e-6)


def test_meta_training_lowers_the_adapted_loss(data_and_tasks, trained):
    _, tasks = data_and_tasks
    learner, before, history = trained
    assert np.all(np.isfinite(history.history["loss"]))
    # The adapted query loss of the meta-training users, which meta-training minimises (the 12
    # validation users of this small set are too few to show it reliably in 3 epochs).
    assert learner.evaluate(tasks.train, verbose=0)["loss"] < before
    # Only the update rule's and the model's weights are meta-trained; the rule is among them.
    rule = {id(v) for v in learner.update_rule.trainable_variables}
    assert rule <= {id(v) for v in learner.meta_variables}


def test_adapts_only_the_selected_weights(data_and_tasks):
    _, tasks = data_and_tasks
    learner = make(tasks, adapt=["decision_output"])
    params, non_trainable = learner.snapshot()
    adapted, fixed = learner.adapt_user(params, non_trainable, *one_user(tasks))
    paths = [learner.model.trainable_variables[i].path for i in learner.forward.adapt_index]
    assert paths and all("decision_output" in p for p in paths)
    assert [tuple(a.shape) for a in adapted] == [tuple(learner.model.trainable_variables[i].shape)
                                                for i in learner.forward.adapt_index]
    start, _ = learner.forward.split(learner.split_meta(params)[0])
    assert max(np.abs(np.asarray(a) - np.asarray(w)).max() for a, w in zip(adapted, start)) > 1e-4


def test_adapt_many_matches_single_users_and_saving_keeps_the_rule(data_and_tasks, trained, tmp_path):
    data, tasks = data_and_tasks
    learner, _, _ = trained
    supports = [tasks.test.support_frame(i)[["item_id", "rating"]] for i in range(3)]
    items = data.items.index.to_numpy()[:20]
    batched = learner.score_many(learner.adapt_many(supports), [items] * 3)
    for i in range(3):
        np.testing.assert_allclose(batched[i], learner.adapt(supports[i]).score(items), rtol=1e-5, atol=1e-5)
    assert not np.allclose(batched[0], learner.predict_items(items))  # the rule adapts
    path = tmp_path / "lstm.keras"
    learner.save(path)
    loaded = metarec.load(path)
    assert isinstance(loaded, LSTMMetaLearner)
    assert (loaded.form, loaded.hidden_size, loaded.inner_steps) == ("andrychowicz", 8, 2)
    for a, b in zip(loaded.update_rule.get_weights(), learner.update_rule.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loaded.adapt(supports[0]).score(items), batched[0], rtol=1e-5, atol=1e-5)


def test_ravi_larochelle_form_saves_its_gates(data_and_tasks, tmp_path):
    data, tasks = data_and_tasks
    learner = make(tasks, form="ravi_larochelle", read_parameters=True)
    rng = np.random.default_rng(0)
    for v in learner.update_rule.trainable_variables:
        v.assign(v.numpy() + rng.normal(scale=0.1, size=v.shape))
    support = tasks.test.support_frame(0)[["item_id", "rating"]]
    items = data.items.index.to_numpy()[:20]
    learner.save(tmp_path / "ravi.keras")
    loaded = metarec.load(tmp_path / "ravi.keras")
    assert (loaded.form, loaded.read_parameters) == ("ravi_larochelle", True)
    np.testing.assert_allclose(loaded.adapt(support).score(items), learner.adapt(support).score(items),
                               rtol=1e-5, atol=1e-5)


def test_score_batch_and_the_server_path(data_and_tasks, trained, tmp_path):
    from metarec_server.inference import RECOMMEND, Job, ServingModel, run_batch

    data, tasks = data_and_tasks
    learner, _, _ = trained
    model_dir = tmp_path / "models"
    (model_dir / "1").mkdir(parents=True)
    learner.save(model_dir / "1" / "model.keras")
    interactions = data.interactions.groupby("user_id").head(10)[["user_id", "item_id", "rating"]]
    first = interactions[interactions.user_id == interactions.user_id.iloc[0]]
    expected = learner.adapt(first[["item_id", "rating"]]).recommend(k=5)
    # score-batch
    out = score_batch(str(model_dir), interactions[interactions.user_id.isin(interactions.user_id.unique()[:8])],
                      tmp_path / "recs", k=5, verbose=0)
    recs = pd.read_parquet(out)
    mine = recs[recs.user_id == first.user_id.iloc[0]].sort_values("rank")
    np.testing.assert_array_equal(mine["item_id"].to_numpy(), expected["item_id"].to_numpy())
    # the server's batch path
    model = ServingModel.from_learner(metarec.load(model_dir / "1" / "model.keras"))
    idx = learner.encoder.item_index(first["item_id"].to_numpy()).astype(np.int32)
    job = Job(RECOMMEND, idx, first["rating"].to_numpy(np.float32), None, {}, None, 5, True, None)
    (result,) = run_batch(model, [job], None)
    np.testing.assert_array_equal(learner.encoder.item_ids[result.item_idx], expected["item_id"].to_numpy())


def test_bad_settings(data_and_tasks):
    _, tasks = data_and_tasks
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=4, hidden_units=(8,))
    for value in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"hidden_size must be a positive integer; got hidden_size={value!r}"):
            LSTMMetaLearner(model, hidden_size=value)
    with pytest.raises(ValueError, match="got form='adam'"):
        LSTMMetaLearner(model, form="adam")
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 0; got -1"):
        LSTMMetaLearner(model, inner_steps=-1)
    with pytest.raises(ValueError, match="got inner_lr=1.5"):
        LSTMMetaLearner(model, form="ravi_larochelle", inner_lr=1.5)
    with pytest.raises(ValueError, match="learn_inner_lr='per_parameter'"):
        LSTMMetaLearner(model, learn_inner_lr="per_parameter")
