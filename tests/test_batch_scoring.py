"""`metarec score-batch`: vectorised top-k for many users, resumable without duplicates."""

import numpy as np
import pandas as pd
import pytest

from metarec.batch_scoring import score_batch
from metarec.cli import main


@pytest.fixture(scope="module")
def saved_model(small_maml, tmp_path_factory):
    learner, _, data = small_maml
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


def _user_rows(frame):
    """Each user's (item, rating) rows, as a comparable dict."""
    return {u: list(zip(g["item_id"], g["rating"])) for u, g in frame.groupby("user_id", sort=False)}


@pytest.mark.parametrize("layout", ["sorted-parquet-folder", "unsorted-csv"])
def test_streamed_chunks_hold_whole_users(saved_model, tmp_path, monkeypatch, layout):
    """Record batches of 7 rows cut users in two; files cut them too. Every chunk must still
    hold every row of its users, each user once, in the input's row order."""
    from metarec import user_chunks

    _, _, interactions, _ = saved_model
    monkeypatch.setattr(user_chunks, "BATCH_ROWS", 7)
    if layout == "sorted-parquet-folder":
        ordered = interactions.sort_values("user_id", kind="stable").reset_index(drop=True)
        path = tmp_path / "folder"
        path.mkdir()
        half = len(ordered) // 2 + 3  # mid-user: the user's rows go on in the next file
        ordered.iloc[:half].to_parquet(path / "a.parquet")
        ordered.iloc[half:].to_parquet(path / "b.parquet")
        assert user_chunks.is_sorted_by_user(user_chunks.open_dataset(path))
        chunks = list(user_chunks.iter_user_chunks(path, 16))
    else:
        ordered = interactions.sample(frac=1.0, random_state=0).reset_index(drop=True)
        path = tmp_path / "input.csv"
        ordered.to_csv(path, index=False)
        assert not user_chunks.is_sorted_by_user(user_chunks.open_dataset(path))
        chunks = list(user_chunks.iter_user_chunks(path, 16, partition_rows=300))
    seen = [c["user_id"].unique() for c in chunks]
    assert all(len(s) <= 16 for s in seen)
    flat = np.concatenate(seen)
    assert len(flat) == len(set(flat)) == interactions["user_id"].nunique()
    assert _user_rows(pd.concat(chunks)) == _user_rows(ordered)


def test_a_streamed_unsorted_file_gives_the_in_memory_job_s_top_k(saved_model, tmp_path, monkeypatch):
    from metarec import user_chunks

    folder, learner, interactions, data = saved_model
    monkeypatch.setattr(user_chunks, "BATCH_ROWS", 50)
    shuffled = interactions.sample(frac=1.0, random_state=2)
    path = tmp_path / "users.parquet"
    shuffled.to_parquet(path)
    features = data.users.loc[sorted(interactions["user_id"].unique())[::3]]
    kwargs = dict(k=4, user_features=features, chunk_users=16, verbose=0)
    memory = pd.read_parquet(score_batch(learner, shuffled, tmp_path / "a", **kwargs))
    streamed = pd.read_parquet(score_batch(learner, path, tmp_path / "b", **kwargs))
    key = ["user_id", "rank"]
    pd.testing.assert_frame_equal(streamed.sort_values(key).reset_index(drop=True),
                                  memory.sort_values(key).reset_index(drop=True))


def test_user_feature_lookup(saved_model):
    from metarec.batch_scoring import UserFeatureLookup

    _, _, _, data = saved_model
    users = data.users.iloc[:5]
    lookup = UserFeatureLookup(users)
    got = lookup.rows(np.asarray([users.index[3], "nobody", users.index[0]], dtype=object))
    assert got == [users.iloc[3].to_dict(), {}, users.iloc[0].to_dict()]
    with pytest.raises(ValueError, match="users twice"):
        UserFeatureLookup(pd.concat([users, users.iloc[:1]]))


def test_the_sdk_works_without_ray_and_the_ray_engine_says_how_to_install_it():
    """Ray is imported only by the Ray engine; without it, the engine says what to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
        "import metarec, metarec.cli, metarec.batch_scoring, metarec.ray_scoring\n"
        "from metarec.ray_scoring import require_ray\n"
        "try:\n    require_ray()\nexcept ImportError as e:\n    print('MSG', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "pip install 'metarec[ray]'" in out.stdout
