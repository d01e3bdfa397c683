"""Meta-learners as a user runs them: fit with callbacks, adapt, score, recommend, save, load."""

import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pandas as pd
import pytest

import metarec
from metarec.pretraining import fit_global_model


@pytest.fixture(scope="module")
def tasks():
    data = metarec.datasets.synthetic(seed=0)
    return data, metarec.UserTasks(data, support_size=10, split="time", user_split="time")


def make_learner(tasks, cls=metarec.MAML, learning_rate=3e-3, **kwargs):
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16, 16))
    kwargs.setdefault("inner_steps", 2)
    kwargs.setdefault("inner_lr", 0.05)
    learner = cls(model, **kwargs)
    learner.compile(optimizer=keras.optimizers.Adam(learning_rate))
    return learner


@pytest.fixture(scope="module")
def trained(tasks):
    _, t = tasks
    keras.utils.set_random_seed(0)
    learner = metarec.MAML(metarec.models.rating_mlp(t.encoder), inner_steps=3, inner_lr=0.05,
                           learn_inner_lr="per_layer")
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = learner.fit(t.train, validation_data=t.val, epochs=15, batch_size=32, verbose=0, seed=0)
    return learner, history


def test_fit_history_and_validation(trained):
    learner, history = trained
    assert set(history.history) >= {"loss", "val_loss", "val_loss_before"}
    losses = history.history["loss"]
    assert len(losses) == 15 and losses[-1] < losses[0]


def test_meta_training_lowers_adapted_query_loss(tasks, trained):
    _, t = tasks
    learner, _ = trained
    untrained = make_learner(t)
    untrained.feedback = "explicit"
    assert learner.evaluate(t.test, verbose=0)["loss"] < untrained.evaluate(t.test, verbose=0)["loss"]


def test_adaptation_lowers_query_loss(tasks, trained):
    _, t = tasks
    learner, _ = trained
    scores = learner.evaluate(t.test, verbose=0)
    assert scores["loss"] < scores["loss_before"]


def test_meta_learning_beats_ordinary_training_after_adaptation(tasks, trained):
    """The same network trained the ordinary way does worse, adapted or not, than the
    meta-learned one after adaptation."""
    _, t = tasks
    learner, _ = trained
    keras.utils.set_random_seed(0)
    plain = metarec.models.rating_mlp(t.encoder)
    fit_global_model(plain, t.train, t.val, epochs=15, verbose=0)
    as_init = metarec.MAML(plain, inner_steps=learner.inner_steps, inner_lr=learner.inner_lr,
                           feedback="explicit", encoder=t.encoder)
    plain_scores = as_init.evaluate(t.test, verbose=0)
    best_plain = min(plain_scores["loss"], plain_scores["loss_before"])
    assert learner.evaluate(t.test, verbose=0)["loss"] < best_plain - 0.005


@pytest.mark.parametrize("cls,kwargs", [
    (metarec.MAML, {"first_order": True}),
    (metarec.Reptile, {}),
    (metarec.MetaSGD, {}),
    (metarec.MAML, {"adapt": "all"}),
])
def test_other_learners_train(tasks, cls, kwargs):
    """Two epochs of meta-training lower every learner's adapted validation loss."""
    _, t = tasks
    learner = make_learner(t, cls, **kwargs)
    assert learner.feedback is None  # evaluate takes it from the tasks
    before = learner.evaluate(t.val, verbose=0)["loss"]
    assert learner.feedback == "explicit" and np.isfinite(before)
    history = learner.fit(t.train, epochs=2, batch_size=32, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    after = learner.evaluate(t.val, verbose=0)["loss"]
    assert np.isfinite(after)
    assert after < before


def test_callbacks(tasks, tmp_path):
    _, t = tasks
    learner = make_learner(t)
    ckpt = tmp_path / "best.keras"
    history = learner.fit(
        t.train, validation_data=t.val, epochs=30, batch_size=64, verbose=0,
        callbacks=[
            keras.callbacks.EarlyStopping(patience=0, min_delta=10.0, restore_best_weights=True),
            keras.callbacks.ModelCheckpoint(str(ckpt), monitor="val_loss", save_best_only=True),
            keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb")),
        ],
    )
    # min_delta=10 means no epoch counts as an improvement: stops after the second epoch.
    assert len(history.history["loss"]) == 2
    assert ckpt.exists() and os.listdir(tmp_path / "tb")
    assert isinstance(metarec.load(ckpt), metarec.MAML)


def test_adapt_score_recommend(tasks, trained):
    data, t = tasks
    learner, _ = trained
    support = t.test.support_frame(0)
    features = data.users.loc[t.test.user_ids[0]].to_dict()
    user = learner.adapt(support, features)
    items = data.items.index.to_numpy()[:20]
    scores = user.score(items)
    assert scores.shape == (20,) and np.all(np.isfinite(scores))
    recs = user.recommend(k=5)
    assert list(recs.columns) == ["item_id", "score"] and len(recs) == 5
    assert not set(recs["item_id"]) & set(support["item_id"])
    assert np.all(np.diff(recs["score"].to_numpy()) <= 0)
    # The catalogue ranking agrees with scoring every item.
    all_scores = user.score(None)
    seen = np.isin(learner.encoder.item_ids[1:], support["item_id"].to_numpy())
    all_scores[seen] = -np.inf
    assert recs["item_id"].iloc[0] == learner.encoder.item_ids[1:][np.argmax(all_scores)]
    # Adaptation changes the scores; zero inner steps reproduces the plain model.
    assert not np.allclose(scores, learner.predict_items(items, features))


def test_adapt_many_matches_single_users(tasks, trained):
    data, t = tasks
    learner, _ = trained
    supports = [t.test.support_frame(i) for i in range(5)]
    features = [data.users.loc[u].to_dict() for u in t.test.user_ids[:5]]
    items = [t.test.query_frame(i)["item_id"].to_numpy() for i in range(5)]
    batched = learner.score_many(learner.adapt_many(supports, features), items)
    for i in range(5):
        single = learner.adapt(supports[i], features[i]).score(items[i])
        np.testing.assert_allclose(batched[i], single, rtol=1e-5, atol=1e-5)


def test_zero_inner_steps_scores_like_the_plain_model(tasks, trained):
    data, t = tasks
    learner, _ = trained
    supports = [t.test.support_frame(i) for i in range(3)]
    features = [data.users.loc[u].to_dict() for u in t.test.user_ids[:3]]
    items = t.test.query_frame(0)["item_id"].to_numpy()
    learner.inner_steps = 0
    try:
        users = learner.adapt_many(supports, features)
        scores = learner.score_many(users, [items] * 3)
    finally:
        learner.inner_steps = 3
    for i in range(3):
        plain = learner.predict_items(items, features[i])
        np.testing.assert_allclose(scores[i], plain, rtol=1e-5, atol=1e-5)
    # Padded to a bucket: a shorter list scores the same items the same way.
    assert len(plain) == len(items)
    np.testing.assert_allclose(learner.predict_items(items[:3], features[2]), plain[:3], rtol=1e-5, atol=1e-6)


def test_bad_inputs(tasks, trained):
    _, t = tasks
    learner, _ = trained
    support = t.test.support_frame(0)
    with pytest.raises(ValueError, match="finite"):
        learner.adapt(support.assign(rating=np.nan))
    with pytest.raises(ValueError, match="outside"):
        learner.adapt(support.assign(rating=9.0))
    with pytest.raises(ValueError, match="empty"):
        learner.adapt_many([])
    with pytest.raises(ValueError, match="k must"):
        learner.adapt(support).recommend(k=0)
    with pytest.raises(ValueError, match="adapt"):
        metarec.MAML(learner.model, adapt="nonsense")
    with pytest.raises(ValueError, match="inner_steps"):
        metarec.MAML(learner.model, inner_steps=-1)
    with pytest.raises(ValueError, match="compile"):
        metarec.MAML(learner.model).fit(t.train)


def test_save_load_round_trip(tasks, trained, tmp_path):
    data, t = tasks
    learner, _ = trained
    path = tmp_path / "meta.keras"
    learner.save(path)
    loaded = metarec.load(path)
    assert type(loaded) is type(learner)
    assert loaded.get_config()["inner_steps"] == learner.inner_steps
    support = t.test.support_frame(1)
    items = data.items.index.to_numpy()[:30]
    np.testing.assert_allclose(
        loaded.adapt(support).score(items), learner.adapt(support).score(items), rtol=1e-6, atol=1e-6
    )


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a .keras archive"):
        metarec.load(bad)
    with pytest.raises(ValueError, match="No model file"):
        metarec.load(tmp_path / "missing.keras")


def test_damaged_model_files(tasks, tmp_path):
    """A truncated archive and one whose members are damaged are refused with a ValueError
    naming the file, not a zipfile, h5py or JSON error."""
    _, t = tasks
    learner = make_learner(t)
    good = tmp_path / "good.keras"
    learner.save(good)
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"truncated\.keras.*(not a \.keras archive|Could not load)"):
        metarec.load(truncated)
    # Damage every member's data but keep the zip's directory: it still looks like a zip.
    with zipfile.ZipFile(good) as archive:
        infos = archive.infolist()
    damaged_bytes = bytearray(raw)
    for info in infos:
        header = raw[info.header_offset: info.header_offset + 30]  # the local file header
        start = (info.header_offset + 30 + int.from_bytes(header[26:28], "little")
                 + int.from_bytes(header[28:30], "little"))
        for i in range(start, start + min(info.compress_size, 64)):
            damaged_bytes[i] ^= 0xFF
    damaged = tmp_path / "damaged.keras"
    damaged.write_bytes(bytes(damaged_bytes))
    assert zipfile.is_zipfile(damaged)
    with pytest.raises(ValueError, match=r"Could not load the model file .*damaged\.keras"):
        metarec.load(damaged)


def test_plain_keras_model_file_is_refused(tasks, tmp_path):
    """A .keras file of an ordinary Keras model (not saved by metarec) is not a meta-learner."""
    _, t = tasks
    plain = metarec.models.rating_mlp(t.encoder, embedding_dim=4, hidden_units=(8,))
    path = tmp_path / "plain.keras"
    plain.save(path)
    with pytest.raises(ValueError, match=r"plain\.keras.* not a metarec meta-learner"):
        metarec.load(path)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    other.save(tmp_path / "dense.keras")
    with pytest.raises(ValueError, match="not a metarec meta-learner"):
        metarec.load(tmp_path / "dense.keras")


def test_empty_task_sets_are_refused(tasks):
    """fit on no users trains nothing, and a loss over no users would read as 0.0 (a perfect
    score to EarlyStopping): both are refused, naming the set and its size."""
    data, t = tasks
    learner = make_learner(t)
    no_val = metarec.UserTasks(data, support_size=10, fractions=(1.0, 0.0, 0.0))
    no_train = metarec.UserTasks(data, support_size=10, fractions=(0.0, 0.5, 0.5))
    assert len(no_val.val) == 0 and len(no_train.train) == 0
    with pytest.raises(ValueError, match=r"training set x is empty.*size 0"):
        learner.fit(no_train.train, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"validation_data is empty.*size 0"):
        learner.fit(t.train, validation_data=no_val.val, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"evaluation set x is empty.*size 0"):
        learner.evaluate(no_val.val, verbose=0)
    # Users but no query interactions: nothing to score either.
    no_query = metarec.UserTasks(data, support_size=100, min_interactions=1)
    assert len(no_query.test) and not any(len(no_query.test.query_frame(i)) for i in range(len(no_query.test)))
    with pytest.raises(ValueError, match=r"no query interactions.*users"):
        learner.evaluate(no_query.test, verbose=0)
    # The refusals changed nothing: the learner still trains and evaluates.
    learner.fit(t.train, validation_data=t.val, epochs=1, verbose=0)
    assert np.isfinite(learner.evaluate(t.val, verbose=0)["loss"])


class RecordWeightsAtBatch(keras.callbacks.Callback):
    """Reads the model's weights in on_train_batch_end (at ``batch``, or at every batch)."""

    def __init__(self, batch=None, stop=False):
        super().__init__()
        self.batch, self.stop, self.seen = batch, stop, {}

    def on_train_batch_end(self, batch, logs=None):
        if self.batch is None or batch == self.batch:
            self.seen[batch] = [np.array(w) for w in self.model.get_weights()]
            if self.stop:
                self.model.stop_training = True


def test_batch_level_callbacks_see_current_weights(tasks):
    """On JAX, fit keeps the weights as arrays between steps; a callback reading the model in
    on_train_batch_end must still see the weights after that batch's update."""
    _, t = tasks
    learner = make_learner(t)
    initial = [np.array(w) for w in learner.get_weights()]
    record = RecordWeightsAtBatch(batch=2, stop=True)
    learner.fit(t.train, epochs=1, batch_size=32, verbose=0, callbacks=[record])
    seen = record.seen[2]
    assert any(not np.allclose(a, b) for a, b in zip(seen, initial))
    # Training stopped right after batch 2: what fit leaves in the variables (written back at
    # the end) is the state the callback should have seen.
    for a, b in zip(seen, learner.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_reading_weights_every_batch_does_not_change_training(tasks):
    """Writing the state back for a callback, and reading it again before the next step,
    leaves training exactly as it is with no callback."""
    _, t = tasks
    quiet = make_learner(t)
    quiet.fit(t.train, epochs=2, batch_size=64, verbose=0, seed=1)
    watched = make_learner(t)
    record = RecordWeightsAtBatch()
    watched.fit(t.train, epochs=2, batch_size=64, verbose=0, seed=1, callbacks=[record])
    assert len(record.seen) == t.train.num_batches(64)
    assert any(not np.allclose(a, b) for a, b in zip(record.seen[0], record.seen[1]))
    for a, b in zip(watched.get_weights(), quiet.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_weights_are_written_back_once_per_epoch_without_such_callbacks(tasks, monkeypatch):
    """With no callback reading the model mid-epoch, fit writes the weights back once per
    epoch, not after every step."""
    _, t = tasks
    syncs = []

    class Counting(metarec.backend.TrainStep):
        def sync(self):
            syncs.append(1)
            super().sync()

    monkeypatch.setattr(metarec.backend, "TrainStep", Counting)
    learner = make_learner(t)
    learner.fit(t.train, epochs=2, batch_size=64, verbose=0,
                callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: None)])
    assert len(syncs) == 2


CROSS_BACKEND = """
import sys, numpy as np, pandas as pd, metarec
learner = metarec.load(sys.argv[1])
support = pd.read_csv(sys.argv[2])
items = np.load(sys.argv[3])
np.save(sys.argv[4], learner.adapt(support).score(items))
"""


def test_file_loads_under_the_other_backend(tasks, trained, tmp_path):
    data, t = tasks
    learner, _ = trained
    other = "jax" if keras.backend.backend() == "tensorflow" else "tensorflow"
    path, support_csv = tmp_path / "meta.keras", tmp_path / "support.csv"
    items, out = tmp_path / "items.npy", tmp_path / "scores.npy"
    learner.save(path)
    support = t.test.support_frame(2)[["item_id", "rating"]]
    support.to_csv(support_csv, index=False)
    np.save(items, data.items.index.to_numpy()[:40])
    proc = subprocess.run(
        [sys.executable, "-c", CROSS_BACKEND, str(path), str(support_csv), str(items), str(out)],
        env=dict(os.environ, KERAS_BACKEND=other), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = learner.adapt(pd.read_csv(support_csv)).score(np.load(items))
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-5)


def test_learned_inner_rates_save_and_load(tasks, tmp_path):
    """Meta-SGD's rates train, save with the optimizer state, and load in the right places."""
    _, t = tasks
    learner = make_learner(t, metarec.MetaSGD)
    initial = [np.array(w) for w in learner.inner_lr_weights]
    learner.fit(t.train, epochs=1, verbose=0)
    assert any(not np.allclose(np.array(w), w0) for w, w0 in zip(learner.inner_lr_weights, initial))
    learner.save(tmp_path / "msgd.keras")
    loaded = metarec.load(tmp_path / "msgd.keras")
    for a, b in zip(loaded.inner_lr_weights, learner.inner_lr_weights):
        np.testing.assert_allclose(np.array(a), np.array(b))
    support = t.test.support_frame(0)
    np.testing.assert_allclose(loaded.adapt(support).score([1, 2, 3]),
                               learner.adapt(support).score([1, 2, 3]), rtol=1e-6, atol=1e-6)
