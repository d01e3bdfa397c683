"""The service with a two-headed catalogue model: Recommend ranks by the ranking head, Score
returns the rating head, both equal to the SDK's answers, and a batch mixing the two is
answered like two separate calls. A real server on loopback."""

import shutil

import numpy as np
import pandas as pd
import pytest

keras = pytest.importorskip("keras")
metarec = pytest.importorskip("metarec")

from metarec.client import Client  # noqa: E402
from metarec_server.app import ServerConfig  # noqa: E402
from metarec_server.background import BackgroundServer  # noqa: E402
from metarec_server.inference import Job, ServingModel, run_batch  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SUPPORT = pd.DataFrame({"item_id": [5, 17, 42, 99, 230, 301], "rating": [5.0, 4.0, 1.0, 3.0, 2.0, 4.0]})
FEATURES = {"segment": "segment_1", "age": 31}
CANDIDATES = [3, 8, 17, 64, 128, 200, 250, 399]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    data = metarec.datasets.synthetic(seed=0)
    tasks = metarec.UserTasks(data, support_size=10)
    keras.utils.set_random_seed(0)
    learner = metarec.presets.catalogue_two_tower(tasks, embedding_dim=16, cosine_dim=4, outer_lr=1e-3)
    learner.fit(tasks.train, epochs=1, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("two_heads") / "model.keras"
    learner.save(path)
    return path


@pytest.fixture(scope="module")
def sdk(model_file):
    return metarec.load(model_file)


@pytest.fixture(scope="module")
def client(model_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    version = root / "models" / "1"
    version.mkdir(parents=True)
    shutil.copy(model_file, version / "model.keras")
    config = ServerConfig(model_dir=root / "models", port=0, log_path=root / "log.sqlite")
    with BackgroundServer(config) as server, Client(server.address, timeout=60) as c:
        yield c


def test_recommend_ranks_by_the_ranking_head_and_score_returns_ratings(client, sdk):
    user = sdk.adapt(SUPPORT, FEATURES)
    want = user.recommend(k=10)
    got = client.recommend(SUPPORT, k=10, user_features=FEATURES)
    assert [int(i) for i in got.item_ids] == want["item_id"].tolist()
    np.testing.assert_allclose(got.scores, want["score"], rtol=1e-4, atol=1e-4)
    ratings = client.score(SUPPORT, CANDIDATES, user_features=FEATURES).scores
    np.testing.assert_allclose(ratings, user.score(CANDIDATES), rtol=1e-5, atol=1e-5)
    ranking = sdk.score_many([user], [CANDIDATES], head="ranking")[0]
    assert not np.allclose(ratings, ranking)  # two different heads


def test_a_batch_mixing_score_and_recommend_gives_each_its_head(sdk):
    served = ServingModel.from_learner(sdk)
    idx = sdk.encoder.item_index(np.asarray(SUPPORT["item_id"]))
    cand = sdk.encoder.item_index(np.asarray(CANDIDATES))
    common = dict(support_idx=idx.astype(np.int32), ratings=SUPPORT["rating"].to_numpy(np.float32),
                  timestamps=None, user_features={}, candidates=cand.astype(np.int32), k=3,
                  exclude_seen=True, cache_key=None)
    score_job, rec_job = Job(mode="score", **common), Job(mode="recommend", **common)
    mixed = run_batch(served, [score_job, rec_job], None)
    alone = [run_batch(served, [score_job], None)[0], run_batch(served, [rec_job], None)[0]]
    for a, b in zip(mixed, alone):
        np.testing.assert_array_equal(a.item_idx, b.item_idx)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
