"""`metarec score-batch`: vectorised top-k for many users, resumable without duplicates."""

import keras
import numpy as np
import pandas as pd
import pytest

import metarec
from metarec.batch_scoring import score_batch
from metarec.cli import main


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    data = metarec.datasets.synthetic(num_users=120, num_items=80, seed=3)
    tasks = metarec.UserTasks(data, support_size=10)
    keras.utils.set_random_seed(0)
    learner = metarec.MAML(metarec.models.rating_mlp(tasks.encoder, embedding_dim=8,
                                                     hidden_units=(16,)), inner_steps=2, inner_lr=0.05)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.fit(tasks.train, epochs=1, verbose=0)
    folder = tmp_path_factory.mktemp("models")
    (folder / "1").mkdir()
    learner.save(folder / "1" / "model.keras")
    interactions = data.interactions.groupby("user_id").head(10)[["user_id", "item_id", "rating"]]
    return folder, learner, interactions, data


def test_cli_writes_top_k_and_resumes(saved_model, tmp_path):
    folder, learner, interactions, data = saved_model
    inter_path, cand_path = tmp_path / "users.parquet", tmp_path / "items.parquet"
    interactions.to_parquet(inter_path)
    candidates = data.items.index.to_numpy()[:50]
    pd.DataFrame({"item_id": candidates}).to_parquet(cand_path)
    out = tmp_path / "recs"
    args = ["score-batch", "--model", str(folder), "--interactions", str(inter_path),
            "--candidates", str(cand_path), "--k", "5", "--out", str(out), "--chunk-users", "32",
            "--quiet"]
    assert main(args) == 0
    recs = pd.read_parquet(out)
    n_users = interactions["user_id"].nunique()
    assert len(recs) == 5 * n_users and recs.groupby("user_id").size().eq(5).all()
    assert set(recs["item_id"]) <= set(candidates)
    # No recommended item was in the user's own interactions.
    seen = set(zip(interactions["user_id"], interactions["item_id"]))
    assert not any((u, i) in seen for u, i in zip(recs["user_id"], recs["item_id"]))
    # Same as the SDK for one user.
    u = recs["user_id"].iloc[0]
    expected = learner.adapt(interactions[interactions.user_id == u][["item_id", "rating"]])
    expected = expected.recommend(k=5, candidates=candidates)
    np.testing.assert_array_equal(recs[recs.user_id == u]["item_id"].to_numpy(), expected["item_id"])
    # Interrupted run: one part lost; a rerun rebuilds it and duplicates nothing.
    parts = sorted(out.glob("part-*.parquet"))
    parts[1].unlink()
    assert main(args) == 0
    again = pd.read_parquet(out)
    assert len(again) == len(recs)
    pd.testing.assert_frame_equal(
        again.sort_values(["user_id", "rank"]).reset_index(drop=True),
        recs.sort_values(["user_id", "rank"]).reset_index(drop=True),
    )
    # A rerun with other settings into the same folder is refused.
    assert main(args[:-3] + ["--chunk-users", "16", "--quiet"]) == 2


def test_bad_inputs(saved_model, tmp_path):
    folder, learner, interactions, _ = saved_model
    with pytest.raises(ValueError, match="lack columns"):
        score_batch(learner, interactions.drop(columns="rating"), tmp_path / "a", verbose=0)
    with pytest.raises(ValueError, match="empty"):
        score_batch(learner, interactions.iloc[:0], tmp_path / "b", verbose=0)
    with pytest.raises(ValueError, match="No model"):
        score_batch(tmp_path / "nothing", interactions, tmp_path / "c", verbose=0)
    with pytest.raises(ValueError, match="finite"):
        score_batch(learner, interactions.assign(rating=np.nan), tmp_path / "d", verbose=0)


def test_user_features_and_unsorted_input_match_the_sdk(saved_model, tmp_path):
    folder, learner, interactions, data = saved_model
    shuffled = interactions.sample(frac=1.0, random_state=0)  # users' rows interleaved
    users = sorted(interactions["user_id"].unique())
    features = data.users.loc[users[::2]]  # every other user has features; the rest use {}
    candidates = data.items.index.to_numpy()[:40]
    out = score_batch(learner, shuffled, tmp_path / "recs", candidates=candidates, k=4,
                      user_features=features, chunk_users=16, verbose=0)
    recs = pd.read_parquet(out)
    for u in (users[0], users[1], users[-1]):
        frame = interactions[interactions.user_id == u][["item_id", "rating"]]
        feats = features.loc[u].to_dict() if u in features.index else {}
        expected = learner.adapt(frame, feats).recommend(k=4, candidates=candidates)
        got = recs[recs.user_id == u].sort_values("rank")
        np.testing.assert_array_equal(got["item_id"].to_numpy(), expected["item_id"].to_numpy())
        np.testing.assert_allclose(got["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-5)


def test_a_failed_part_write_stops_the_job_and_a_rerun_completes(saved_model, tmp_path, monkeypatch):
    """Parts are written on a background thread while the next chunk is scored: a write error
    must still stop the job, keep the parts already written, and leave nothing half-written."""
    folder, learner, interactions, _ = saved_model
    out = tmp_path / "recs"
    real = pd.DataFrame.to_parquet
    calls = {"n": 0}

    def flaky(self, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", flaky)
    with pytest.raises(OSError, match="disk full"):
        score_batch(learner, interactions, out, k=3, chunk_users=16, verbose=0)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    names = sorted(p.name for p in out.iterdir())
    assert "part-00000.parquet" in names and "part-00001.parquet" not in names
    score_batch(learner, interactions, out, k=3, chunk_users=16, verbose=0)
    recs = pd.read_parquet(out)
    n_users = interactions["user_id"].nunique()
    assert len(recs) == 3 * n_users and not recs.duplicated(["user_id", "rank"]).any()
