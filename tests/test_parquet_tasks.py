"""ParquetTasks: meta-training on users read from Parquet a chunk at a time."""

import keras
import numpy as np
import pytest

import metarec
from metarec import user_chunks
from metarec.parquet_tasks import ParquetTasks


@pytest.fixture(scope="module")
def data_and_files(tmp_path_factory):
    data = metarec.datasets.synthetic(num_users=90, num_items=60, seed=4)
    frame = data.interactions.sort_values("user_id", kind="stable").reset_index(drop=True)
    folder = tmp_path_factory.mktemp("parquet")
    cut = len(frame) // 3 + 5  # mid-user: a user's rows go on in the next file
    frame.iloc[:cut].to_parquet(folder / "a.parquet")
    frame.iloc[cut:].to_parquet(folder / "b.parquet")
    encoder = metarec.FeatureEncoder.fit(data)
    users = sorted(frame["user_id"].unique())
    in_memory = metarec.UserTasks(data, support_size=5, split="time", encoder=encoder,
                                  user_split={"train": users}, min_interactions=6)
    return data, folder, encoder, in_memory


def _assert_same_episodes(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for part in ("support", "query"):
            assert a._asdict()[part].keys() == b._asdict()[part].keys()
            for name in b._asdict()[part]:
                np.testing.assert_array_equal(a._asdict()[part][name], b._asdict()[part][name])
        for field in ("support_y", "support_mask", "query_y", "query_mask"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_streamed_episodes_equal_the_in_memory_ones(data_and_files, monkeypatch):
    """Record batches of 11 rows and chunks of 8 users (not a multiple of the batch size, so
    users are carried to the next chunk): the batches are still those of UserTasks."""
    _, folder, encoder, in_memory = data_and_files
    monkeypatch.setattr(user_chunks, "BATCH_ROWS", 11)
    tasks = ParquetTasks(folder, encoder, support_size=5, split="time", chunk_users=8)
    assert len(tasks) == len(in_memory.train) and tasks.num_batches(6) == in_memory.train.num_batches(6)
    got = list(tasks.episodes(6, max_query=16, seed=2))
    _assert_same_episodes(got, list(in_memory.train.episodes(6, max_query=16, seed=2)))
    # Shuffled: every user still appears once (each batch's real users are its mask rows).
    shuffled = list(tasks.episodes(6, shuffle=True, seed=1))
    assert len(shuffled) == len(got)
    assert sum(int(e.support_mask.any(axis=1).sum()) for e in shuffled) == len(tasks)


def test_fit_on_parquet_equals_fit_in_memory(data_and_files):
    data, folder, encoder, _ = data_and_files
    users = sorted(data.interactions["user_id"].unique())
    in_memory = metarec.UserTasks(data, support_size=5, split="random", encoder=encoder,
                                  user_split={"train": users}, min_interactions=6).train
    streamed = ParquetTasks(folder, encoder, support_size=5, split="random", chunk_users=16)
    weights = []
    for tasks in (in_memory, streamed):
        keras.utils.set_random_seed(0)
        learner = metarec.MAML(metarec.models.rating_mlp(encoder, embedding_dim=4, hidden_units=(8,)),
                               inner_steps=1, inner_lr=0.05)
        learner.compile(optimizer=keras.optimizers.Adam(1e-2))
        history = learner.fit(tasks, epochs=2, batch_size=8, shuffle=False, seed=3, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        weights.append([np.asarray(w) for w in learner.get_weights()])
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_arguments(data_and_files, tmp_path):
    data, folder, encoder, _ = data_and_files
    with pytest.raises(ValueError, match="FeatureEncoder"):
        ParquetTasks(folder, encoder=None)
    with pytest.raises(ValueError, match="split"):
        ParquetTasks(folder, encoder, split="sideways")
    data.interactions.drop(columns="rating").to_parquet(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="lacks columns"):
        ParquetTasks(tmp_path / "x.parquet", encoder)
