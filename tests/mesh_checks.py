"""Data-parallel meta-training on a 4-device mesh against one device (JAX).

Not collected by a plain ``pytest`` run: ``tests/test_data_parallel_mesh.py`` runs this module
in its own process with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the flag must
be set before JAX starts), so that the CPU shows four devices.
"""

import jax
import keras
import numpy as np
import pytest

import metarec
from metarec import backend
from metarec.catalogue_objective import CatalogueObjective
from metarec.sampling import NegativeSampler

DEVICES = 4
BATCH = 16  # four users per device
EPOCHS = 2


def test_the_process_sees_four_devices():
    # Every other check here means nothing on one device.
    assert keras.backend.backend() == "jax"
    assert jax.device_count() == DEVICES


@pytest.fixture(scope="module")
def data():
    return metarec.datasets.synthetic(num_users=96, num_items=60, seed=0)


@pytest.fixture(scope="module")
def tasks(data):
    return metarec.UserTasks(data, support_size=8, split="random", user_split="random",
                             fractions=(1.0, 0.0, 0.0))


def make(tasks, cls=metarec.MAML, **kwargs):
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16,))
    learner = cls(model, inner_steps=1, inner_lr=0.05, **kwargs)
    learner.compile(optimizer=keras.optimizers.Adam(1e-2))
    return learner


def make_catalogue(tasks):
    """A learner whose train batch is (episode, negatives): the negatives are shared by the
    batch's users (the cheap first-order form; the step's layout is what is checked)."""
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16,))
    learner = metarec.MAML(model, inner_steps=1, inner_lr=0.3, first_order=True,
                           objective=CatalogueObjective(NegativeSampler("uniform", num_negatives=16)))
    learner.compile(optimizer=keras.optimizers.Adam(1e-2))
    return learner


class ShardingSpy:
    """Wraps a learner's ``meta_gradients``: records, while the step is traced, how XLA has
    laid out the meta-batch's support ratings."""

    def __init__(self, learner):
        self.seen = []
        inner = learner.meta_gradients

        def meta_gradients(params, non_trainable, batch):
            episode, _ = learner.split_batch(batch)
            jax.debug.inspect_array_sharding(episode.support_y, callback=self.seen.append)
            return inner(params, non_trainable, batch)

        object.__setattr__(learner, "meta_gradients", meta_gradients)


# ------------------------------------------------------------------ one meta-step
@pytest.mark.parametrize("kind", ["maml_second_order", "reptile", "catalogue"])
def test_one_meta_step_gives_the_meta_gradient_of_one_device(tasks, kind):
    if kind == "catalogue":
        learner = make_catalogue(tasks)
    else:
        learner = make(tasks, metarec.Reptile if kind == "reptile" else metarec.MAML)
    learner.prepare(tasks.train)
    episode = next(tasks.train.episodes(BATCH, shuffle=True, seed=0, max_query=32))
    batch = learner.train_batch(episode, 0)
    params, non_trainable = learner.snapshot()

    single = jax.jit(learner.meta_gradients)
    logs_1, grads_1 = single(params, non_trainable, batch)

    mesh = backend.user_mesh(keras.distribution.DataParallel())
    assert mesh.size == DEVICES
    placed = learner.placed_batch(batch, mesh)
    placed_episode, negatives = learner.split_batch(placed)
    for leaf in jax.tree.leaves(placed_episode):  # each device holds its own four users
        assert leaf.sharding == mesh.users
        assert {shard.data.shape[0] for shard in leaf.addressable_shards} == {BATCH // DEVICES}
    if negatives is not None:  # shared by every user: a whole copy on each device
        assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(negatives))

    mesh_args = (mesh.replicate(params), mesh.replicate(non_trainable), placed)
    sharded = jax.jit(learner.meta_gradients).lower(*mesh_args).compile()
    logs_4, grads_4 = sharded(*mesh_args)
    # The mean over users spans the devices: the compiled step reduces across them.
    assert "all-reduce" in sharded.as_text()
    for g1, g4 in zip(grads_1, grads_4):
        assert g4.sharding.is_fully_replicated and len(g4.sharding.device_set) == DEVICES
        np.testing.assert_allclose(np.asarray(g4), np.asarray(g1), rtol=1e-5, atol=1e-6)
    assert max(float(np.abs(np.asarray(g)).max()) for g in grads_1) > 1e-3  # not all zero
    np.testing.assert_allclose(float(logs_4["loss"]), float(logs_1["loss"]), rtol=1e-6)


# ------------------------------------------------------------------ a seeded fit
@pytest.fixture(scope="module")
def single(tasks):
    learner = make(tasks)
    learner.fit(tasks.train, epochs=EPOCHS, batch_size=BATCH, verbose=0, seed=3)
    return learner


@pytest.fixture(scope="module")
def meshed(tasks):
    learner = make(tasks)
    spy = ShardingSpy(learner)
    learner.fit(tasks.train, epochs=EPOCHS, batch_size=BATCH, verbose=0, seed=3,
                distribution=keras.distribution.DataParallel())
    return learner, spy


def test_fit_shards_each_meta_batch_over_the_users(meshed):
    _, spy = meshed
    assert spy.seen, "the train step was never traced"
    for sharding in spy.seen:
        assert sharding.spec == jax.sharding.PartitionSpec("batch")
        assert len(sharding.device_set) == DEVICES


def test_seeded_fit_gives_the_weights_of_one_device(tasks, single, meshed):
    learner, _ = meshed
    for w1, w4, v in zip(single.get_weights(), learner.get_weights(), learner.weights):
        np.testing.assert_allclose(w4, w1, rtol=1e-4, atol=1e-5, err_msg=v.path)
    initial = make(tasks).get_weights()
    assert any(not np.allclose(w0, w4) for w0, w4 in zip(initial, learner.get_weights()))


def test_weights_stay_replicated_on_the_mesh(meshed):
    learner, _ = meshed
    for v in learner.trainable_variables + learner.optimizer.variables:
        sharding = v.value.sharding
        assert sharding.is_fully_replicated and len(sharding.device_set) == DEVICES, v.path


def test_batch_size_must_divide_over_the_devices(tasks):
    learner = make(tasks)
    with pytest.raises(ValueError, match=r"multiple of the 4 devices.*got batch_size=18"):
        learner.fit(tasks.train, epochs=1, batch_size=18, verbose=0,
                    distribution=keras.distribution.DataParallel())


def test_keras_global_distribution_trains_on_the_mesh(tasks, single):
    """The Keras-native way: the model is built and fitted under ``DataParallel().scope()``."""
    with keras.distribution.DataParallel().scope():
        learner = make(tasks)
        created = learner.trainable_variables[0].value.sharding
        spy = ShardingSpy(learner)
        learner.fit(tasks.train, epochs=EPOCHS, batch_size=BATCH, verbose=0, seed=3)
    assert len(created.device_set) == DEVICES  # Keras placed the new variables on the mesh
    assert spy.seen and all(s.spec == jax.sharding.PartitionSpec("batch") for s in spy.seen)
    for w1, w4 in zip(single.get_weights(), learner.get_weights()):
        np.testing.assert_allclose(w4, w1, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ after training
def supports(data, users=3, rows=6):
    frame = data.interactions
    ids = frame["user_id"].drop_duplicates().to_numpy()[:users]
    return [frame[frame["user_id"] == u].head(rows)[["item_id", "rating"]] for u in ids]


def test_mesh_trained_model_adapts_scores_saves_and_loads_like_any_other(data, meshed, tmp_path):
    """Adaptation and scoring on the mesh-trained model (its weights replicated on the four
    devices) give what the same model gives once saved and loaded as a plain one."""
    learner, _ = meshed
    path = tmp_path / "meshed.keras"
    learner.save(path)
    loaded = metarec.load(path)
    for a, b in zip(learner.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert len(loaded.trainable_variables[0].value.sharding.device_set) == 1
    items = np.unique(data.interactions["item_id"].to_numpy())[:20]
    got = learner.score_many(learner.adapt_many(supports(data)), candidates=[items] * 3)
    want = loaded.score_many(loaded.adapt_many(supports(data)), candidates=[items] * 3)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(learner.adapt(supports(data)[0]).score(items), got[0],
                               rtol=1e-5, atol=1e-6)
    top = learner.recommend_many(learner.adapt_many(supports(data)), k=5)
    assert [len(ids) for ids, _ in top] == [5, 5, 5]
