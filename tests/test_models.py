"""The ready-made models: ``ConcatDense`` is a ``Dense`` over a concatenation, computed part
by part, so a user's features can come as one row against many candidate rows."""

import keras
import numpy as np
import pytest

import metarec
from metarec.models import ConcatDense


def test_concat_dense_equals_dense_over_concatenation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 5)).astype("float32")
    b = rng.normal(size=(7, 3)).astype("float32")
    layer = ConcatDense(4, activation="relu")
    out = keras.ops.convert_to_numpy(layer([a, b]))
    dense = keras.layers.Dense(4, activation="relu")
    dense.build((None, 8))
    dense.set_weights([keras.ops.convert_to_numpy(layer.kernel), keras.ops.convert_to_numpy(layer.bias)])
    np.testing.assert_allclose(out, keras.ops.convert_to_numpy(dense(np.concatenate([a, b], 1))),
                               rtol=1e-5, atol=1e-6)
    assert [tuple(w.shape) for w in layer.weights] == [(8, 4), (4,)]
    # One row of b broadcasts against every row of a: the same as b repeated.
    one = keras.ops.convert_to_numpy(layer([a, b[:1]]))
    repeated = keras.ops.convert_to_numpy(layer([a, np.repeat(b[:1], 7, axis=0)]))
    np.testing.assert_allclose(one, repeated, rtol=1e-6, atol=1e-6)
    assert layer.compute_output_shape([(7, 5), (1, 3)]) == (7, 4)
    assert layer.compute_output_shape([(None, 5), (None, 3)]) == (None, 4)


def test_concat_dense_config_round_trip_and_errors():
    layer = ConcatDense(6, activation="tanh", name="decision_1")
    again = ConcatDense.from_config(layer.get_config())
    assert again.units == 6 and again.activation is keras.activations.tanh and again.name == "decision_1"
    with pytest.raises(ValueError, match="got units=0"):
        ConcatDense(0)


@pytest.fixture(scope="module")
def tasks():
    data = metarec.datasets.synthetic(num_users=60, num_items=80, seed=5)
    return metarec.UserTasks(data, support_size=5)


def test_rating_mlp_takes_one_user_row(tasks):
    encoder = tasks.encoder
    keras.utils.set_random_seed(1)
    model = metarec.models.rating_mlp(encoder, embedding_dim=4, hidden_units=(8, 4))
    assert isinstance(model.get_layer("decision_1"), ConcatDense)
    items = encoder.item_inputs(np.arange(1, 11))
    user = encoder.user_inputs_from_features([{"segment": "s1", "age": 30}])
    assert user, "the synthetic data has user features"
    full = dict(items, **{k: np.repeat(v, 10, axis=0) for k, v in user.items()})
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(dict(items, **user))),
                               keras.ops.convert_to_numpy(model(full)), rtol=1e-5, atol=1e-6)


def test_scores_agree_with_and_without_the_one_row_path(tasks):
    """A model that concatenates user and item features cannot take one user row: the learner
    detects it and repeats the row; a ConcatDense model takes the fast path. Both score
    exactly what the model itself predicts for the adapted weights."""
    encoder = tasks.encoder
    keras.utils.set_random_seed(2)
    inputs = metarec.models.feature_inputs(encoder)
    parts = metarec.models.embed_features(encoder, inputs, 4)
    x = keras.layers.Concatenate()(parts)
    x = keras.layers.Dense(8, activation="relu", name="decision_1")(x)
    concat_model = keras.Model(inputs, keras.layers.Dense(1, name="decision_output")(x))
    split_model = metarec.models.rating_mlp(encoder, embedding_dim=4, hidden_units=(8,))
    support = tasks.train.support_frame(0)[["item_id", "rating"]]
    features = {"segment": "s0", "age": 44}
    items = tasks.train.support_frame(1)["item_id"].to_numpy()
    for model, fast in ((concat_model, False), (split_model, True)):
        learner = metarec.MAML(model, inner_steps=2, inner_lr=0.1, feedback="explicit", encoder=encoder)
        assert learner.runtime.user_row_broadcasts() is fast
        user = learner.adapt(support, features)
        scores = user.score(items)
        # The model itself, with the adapted weights set, on fully repeated rows.
        params = [v.value for v in model.trainable_variables]
        merged = learner.forward.merge(user.weights, learner.forward.split(params)[1])
        rows = dict(encoder.item_inputs(encoder.item_index(items)))
        u = encoder.user_inputs_from_features([features])
        rows.update({k: np.repeat(v, len(items), axis=0) for k, v in u.items()})
        want, _ = model.stateless_call(merged, [], rows)
        np.testing.assert_allclose(scores, keras.ops.convert_to_numpy(want)[:, 0], rtol=1e-5, atol=1e-5)
        plain = learner.predict_items(items, features)
        np.testing.assert_allclose(plain, keras.ops.convert_to_numpy(model(rows))[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", ["rating_mlp", "residual_mlp"])
def test_models_want_the_fitted_encoder_not_the_schema(tasks, build):
    # Passing the schema (or the data) instead of tasks.encoder is an easy slip.
    fn = getattr(metarec.models, build)
    args = (np.zeros(tasks.encoder.num_items),) if build == "residual_mlp" else ()
    for wrong in (tasks.encoder.schema, tasks.train):
        with pytest.raises(ValueError, match="fitted FeatureEncoder .*got " + type(wrong).__name__):
            fn(wrong, *args)
    assert fn(tasks.encoder, *args, embedding_dim=4, hidden_units=(4,)).built
