"""Data-parallel meta-training: what ``fit(distribution=...)`` accepts on each backend.

The 4-device checks (the same meta-gradient and weights as one device, adaptation, scoring and
saving of a mesh-trained model) run in their own process: ``tests/test_data_parallel_mesh.py``.
"""

import keras
import pytest

import metarec

TENSORFLOW = keras.backend.backend() == "tensorflow"


@pytest.fixture(scope="module")
def tasks():
    data = metarec.datasets.synthetic(num_users=40, num_items=30, seed=0)
    return metarec.UserTasks(data, support_size=5, split="random", user_split="random",
                             fractions=(1.0, 0.0, 0.0))


def make(tasks):
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=4, hidden_units=(8,))
    learner = metarec.MAML(model, inner_steps=1, inner_lr=0.05)
    learner.compile(optimizer=keras.optimizers.Adam(1e-2))
    return learner


@pytest.mark.skipif(not TENSORFLOW, reason="the TensorFlow backend's refusal")
def test_tensorflow_refuses_a_distribution_and_names_the_jax_backend(tasks):
    learner = make(tasks)
    before = [w.copy() for w in learner.get_weights()]
    with pytest.raises(ValueError, match=r"needs the JAX backend: run with KERAS_BACKEND=jax.*got "
                                         r"distribution=<DataParallel"):
        learner.fit(tasks.train, epochs=1, batch_size=8, verbose=0,
                    distribution=keras.distribution.DataParallel())
    with keras.distribution.DataParallel().scope():  # the Keras global distribution too
        with pytest.raises(ValueError, match="KERAS_BACKEND=jax"):
            learner.fit(tasks.train, epochs=1, batch_size=8, verbose=0)
    assert all((a == b).all() for a, b in zip(before, learner.get_weights()))  # nothing trained
    # Without a distribution, training is as before.
    assert len(learner.fit(tasks.train, epochs=1, batch_size=8, verbose=0).history["loss"]) == 1


@pytest.mark.skipif(TENSORFLOW, reason="JAX: the distributions fit accepts")
def test_only_data_parallel_is_accepted(tasks):
    learner = make(tasks)
    mesh = keras.distribution.DeviceMesh((1,), ["model"], devices=keras.distribution.list_devices()[:1])
    model_parallel = keras.distribution.ModelParallel(layout_map=keras.distribution.LayoutMap(mesh))
    with pytest.raises(ValueError, match=r"pass a keras.distribution.DataParallel.*got "
                                         r"distribution=<ModelParallel"):
        learner.fit(tasks.train, epochs=1, batch_size=8, verbose=0, distribution=model_parallel)


@pytest.mark.skipif(TENSORFLOW, reason="JAX: a mesh of the one device this process has")
def test_a_one_device_mesh_trains_as_without_one(tasks):
    plain, meshed = make(tasks), make(tasks)
    plain.fit(tasks.train, epochs=1, batch_size=8, verbose=0, seed=0)
    meshed.fit(tasks.train, epochs=1, batch_size=8, verbose=0, seed=0,
               distribution=keras.distribution.DataParallel())
    for a, b in zip(plain.get_weights(), meshed.get_weights()):
        assert abs(a - b).max() <= 1e-6
