"""`score-batch --engine ray`: Ray Data with a pool of scoring actors, on a real local Ray
instance (one per module: Ray takes seconds to start)."""

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
