"""`score-batch --engine ray`: Ray Data with a pool of scoring actors, on a real local Ray
instance (one per module: Ray takes seconds to start)."""

import warnings

import keras
import numpy as np
import pandas as pd
import pytest
import ray

import metarec
from metarec.batch_scoring import score_batch
from metarec.cli import main
from metarec.ray_scoring import score_batch_ray

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    data = metarec.datasets.synthetic(num_users=150, num_items=80, seed=5)
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
    # Rows of users interleaved, as an export from a log would have them.
    interactions = interactions.sample(frac=1.0, random_state=1).reset_index(drop=True)
    path = tmp_path_factory.mktemp("input") / "interactions.parquet"
    interactions.to_parquet(path)
    return folder, learner, interactions, path, data


def _sorted(frame):
    return frame.sort_values(["user_id", "rank"]).reset_index(drop=True)


def test_ray_top_k_equals_the_single_process_job_and_the_cli_resumes(local_ray, saved_model, tmp_path):
    folder, learner, interactions, path, data = saved_model
    candidates = data.items.index.to_numpy()[:50]
    users = sorted(interactions["user_id"].unique())
    features = data.users.loc[users[::2]]  # every other user has features; the rest use {}
    local = pd.read_parquet(score_batch(learner, interactions, tmp_path / "local", k=5,
                                        candidates=candidates, user_features=features,
                                        chunk_users=16, verbose=0))
    out = score_batch_ray(folder, path, tmp_path / "ray", k=5, candidates=candidates,
                          user_features=features, chunk_users=16, actors=2, num_cpus=0.5,
                          partitions=6)
    parts = sorted(out.glob("part-*.parquet"))
    assert 1 < len(parts) <= 6
    got = pd.read_parquet(out)
    assert list(got.columns) == list(local.columns)
    assert len(got) == 5 * len(users) and not got.duplicated(["user_id", "rank"]).any()
    # Every user's top-k is the single-process job's: same items in the same order.
    pd.testing.assert_frame_equal(_sorted(got)[["user_id", "rank", "item_id"]],
                                  _sorted(local)[["user_id", "rank", "item_id"]])
    np.testing.assert_allclose(_sorted(got)["score"], _sorted(local)["score"], rtol=1e-5, atol=1e-6)
    # A user's rows are in one part only (partitions hold whole users).
    owners = pd.concat([pd.read_parquet(p, columns=["user_id"]).drop_duplicates() for p in parts])
    assert not owners["user_id"].duplicated().any()

    # Interrupted job: two parts lost. The same job from the command line writes those two
    # again and leaves the others alone.
    cand_path, feat_path = tmp_path / "items.parquet", tmp_path / "features.parquet"
    pd.DataFrame({"item_id": candidates}).to_parquet(cand_path)
    features.rename_axis("user_id").reset_index().to_parquet(feat_path)
    kept = parts[0].stat().st_mtime_ns
    parts[1].unlink()
    parts[-1].unlink()
    args = ["score-batch", "--engine", "ray", "--model", str(folder), "--interactions", str(path),
            "--candidates", str(cand_path), "--user-features", str(feat_path), "--k", "5",
            "--chunk-users", "16", "--partitions", "6", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert parts[0].stat().st_mtime_ns == kept and parts[1].exists() and parts[-1].exists()
    pd.testing.assert_frame_equal(_sorted(pd.read_parquet(out)), _sorted(got))
    # Other settings into the same folder are refused, before any work.
    other = list(args)
    other[other.index("--partitions") + 1] = "5"
    assert main(other) == 2


def test_ray_job_applies_the_unknown_ids_policy_like_the_local_job(local_ray, saved_model, tmp_path):
    """Unknown interaction ids are counted by the actors and reported once with the local
    job's message; "error" writes no part that holds one; unknown feature columns are
    refused before Ray runs anything."""
    from metarec.unknown_ids import UnknownIdsWarning

    folder, learner, interactions, _, data = saved_model
    users = sorted(interactions["user_id"].unique())
    strangers = interactions[interactions["user_id"].isin(users[:3])].groupby("user_id").head(1)
    bad = pd.concat([interactions, strangers.assign(item_id=[10_000_000, 10_000_001, 10_000_000])],
                    ignore_index=True)
    path = tmp_path / "bad.parquet"
    bad.to_parquet(path)
    with pytest.warns(UnknownIdsWarning) as local_warning:
        score_batch(learner, bad, tmp_path / "local", k=5, verbose=0)
    with pytest.warns(UnknownIdsWarning) as ray_warning:
        score_batch_ray(folder, path, tmp_path / "ray", k=5, chunk_users=16, num_cpus=0.5, partitions=4)
    (message,) = [str(w.message) for w in ray_warning if w.category is UnknownIdsWarning]
    assert [message] == [str(w.message) for w in local_warning if w.category is UnknownIdsWarning]
    assert message.startswith("3 interaction item id(s) unknown to the model's catalogue: ")
    assert f"in the supports of 3 of {len(users)} users: distinct unknown ids 2" in message
    assert pd.read_parquet(tmp_path / "ray")["user_id"].nunique() == len(users)

    with pytest.raises(ValueError, match="3 interaction item id.*unknown_ids='warn' or 'ignore'"):
        score_batch_ray(folder, path, tmp_path / "refused", k=5, num_cpus=0.5, partitions=4,
                        unknown_ids="error")
    written = pd.read_parquet(tmp_path / "refused")["user_id"].unique() if any(
        (tmp_path / "refused").glob("part-*.parquet")) else []
    assert not set(written) & set(users[:3])  # no user of a refused partition was written

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownIdsWarning)
        score_batch_ray(folder, path, tmp_path / "quiet", k=5, num_cpus=0.5, partitions=4,
                        unknown_ids="ignore")
    with pytest.raises(ValueError, match="unknown_ids must be one of .* got unknown_ids='sometimes'"):
        score_batch_ray(folder, path, tmp_path / "policy", k=5, unknown_ids="sometimes")
    assert not (tmp_path / "policy").exists()
    features = data.users.loc[users].assign(shoe_size=42)
    with pytest.raises(ValueError, match="unknown user feature 'shoe_size'"):
        score_batch_ray(folder, path, tmp_path / "features", k=5, user_features=features,
                        unknown_ids="error")
    assert not any((tmp_path / "features").glob("part-*.parquet"))
