"""`metarec retrain`: warm-started meta-training on logs, behind a promotion gate."""

import keras
import numpy as np
import pandas as pd
import pytest

import metarec
from metarec.cli import main
from metarec.interaction_log import open_interaction_log
from metarec.retrain import read_logs, retrain


@pytest.fixture()
def setup(tmp_path):
    data = metarec.datasets.synthetic(num_users=400, num_items=120, seed=5)
    users = np.sort(data.interactions["user_id"].unique())
    early, late = users[:150], users[150:]
    first = data.interactions[data.interactions.user_id.isin(early)]
    first_data = metarec.InteractionData(first, data.users.loc[early], data.items)
    tasks = metarec.UserTasks(first_data, support_size=10)
    keras.utils.set_random_seed(0)
    learner = metarec.MAML(metarec.models.rating_mlp(tasks.encoder, embedding_dim=8,
                                                     hidden_units=(16,)), inner_steps=2, inner_lr=0.05)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.fit(tasks.train, epochs=1, verbose=0)  # deliberately under-trained
    model_dir = tmp_path / "models"
    (model_dir / "1").mkdir(parents=True)
    learner.save(model_dir / "1" / "model.keras")
    logs = data.interactions[data.interactions.user_id.isin(late)].astype(
        {"user_id": str, "item_id": str})  # the server logs ids as strings
    return model_dir, logs


def log_through_the_store(logs, location):
    """Write ``logs`` into the interaction log at ``location`` the way the server does: one
    write per user and request (ids as strings, timestamps as given)."""
    with open_interaction_log(location) as store:
        for i, (user, rows) in enumerate(logs.groupby("user_id", sort=False)):
            written = store.write(str(user), zip(rows["item_id"], rows["rating"], rows["timestamp"]),
                                  request_id=f"call-{i}")
            assert written.stored == len(rows)


def test_retrain_promotes_a_better_model(setup, tmp_path):
    model_dir, logs = setup
    result = retrain(model_dir, logs, epochs=6, learning_rate=3e-3, report_dir=tmp_path / "report",
                     verbose=0)
    assert result.promoted and result.new_version == 2
    assert result.new_metrics["mae"] < result.old_metrics["mae"]
    assert (model_dir / "2" / "model.keras").exists()
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".staging")]
    assert (tmp_path / "report" / "report.md").exists()
    assert (tmp_path / "report" / "learning_curves.png").stat().st_size > 1000
    new = metarec.load(model_dir / "2" / "model.keras")
    old = metarec.load(model_dir / "1" / "model.keras")
    support = pd.DataFrame({"item_id": [1, 2, 3], "rating": [5.0, 1.0, 4.0]})
    assert not np.allclose(new.adapt(support).score([4, 5, 6]), old.adapt(support).score([4, 5, 6]))


def test_the_server_log_reads_back_as_logged_from_either_store(log_location):
    """``read_logs`` (what ``metarec retrain --logs`` calls) takes the server's log, a SQLite
    file or a PostgreSQL URL: the rows come back as logged, in log order."""
    data = metarec.datasets.synthetic(num_users=60, num_items=40, seed=5)
    logs = data.interactions.astype({"user_id": str, "item_id": str})
    log_through_the_store(logs, log_location)
    read = read_logs(log_location)
    expected = pd.concat([rows for _, rows in logs.groupby("user_id", sort=False)])
    assert read["user_id"].tolist() == expected["user_id"].tolist()
    assert read["item_id"].tolist() == expected["item_id"].tolist()
    np.testing.assert_array_equal(read["rating"], expected["rating"])
    np.testing.assert_array_equal(read["timestamp"], expected["timestamp"])


def test_retrain_from_a_postgres_log(setup):
    """``metarec retrain --logs postgresql://...`` trains on a shared log and publishes version 2
    (the same path from a SQLite log: tests/test_closed_loop.py). One epoch and a wide gate:
    this checks the path from the log to a new version, not the gain."""
    from tests.conftest import fresh_postgres_database

    model_dir, logs = setup
    databases = fresh_postgres_database()
    url = next(databases)
    try:
        log_through_the_store(logs, url)
        code = main(["retrain", "--model-dir", str(model_dir), "--logs", url, "--epochs", "1",
                     "--margin", "100", "--quiet"])
        assert code == 0
        assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]
    finally:
        next(databases, None)


def test_worse_model_is_refused(setup, tmp_path):
    model_dir, logs = setup
    logs.to_parquet(tmp_path / "logs.parquet")
    # An absurd outer learning rate wrecks the model: the gate must refuse it.
    code = main(["retrain", "--model-dir", str(model_dir), "--logs", str(tmp_path / "logs.parquet"),
                 "--epochs", "2", "--learning-rate", "5.0", "--quiet"])
    assert code == 1
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


def test_bad_inputs(setup, tmp_path):
    model_dir, logs = setup
    with pytest.raises(ValueError, match="lack columns"):
        retrain(model_dir, logs.drop(columns="timestamp"), verbose=0)
    with pytest.raises(ValueError, match="finite"):
        retrain(model_dir, logs.assign(rating=np.nan), verbose=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no numbered model version"):
        retrain(tmp_path / "empty", logs, verbose=0)
    with pytest.raises(ValueError, match="Too few users"):
        retrain(model_dir, logs.groupby("user_id").head(5), verbose=0)


def test_new_users_features_reach_the_tasks():
    """With a kept encoder, users it has never seen read their features from the data's user
    frame (as requests send them), not the unknown-user row; known users keep theirs."""
    data = metarec.datasets.synthetic(num_users=120, num_items=60, seed=2)
    users = np.sort(data.interactions["user_id"].unique())
    old, new = users[:60], users[60:]
    first = metarec.InteractionData(data.interactions[data.interactions.user_id.isin(old)],
                                    data.users.loc[old], data.items)
    encoder = metarec.UserTasks(first, support_size=5).encoder
    later = metarec.InteractionData(data.interactions, data.users, data.items, schema=encoder.schema)
    tasks = metarec.UserTasks(later, support_size=5, encoder=encoder, fractions=(1.0, 0.0, 0.0))
    taskset = tasks.train
    positions = np.arange(len(taskset))
    episode = taskset.episode_for(positions)
    for name in ("segment", "age"):
        got = episode.support[name][:, 0]
        want = encoder.user_inputs_from_features(data.users.loc[taskset.user_ids].reset_index(drop=True))[name]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    is_new = np.isin(taskset.user_ids, new)
    assert is_new.any() and (encoder.user_index(taskset.user_ids[is_new]) == 0).all()
    assert len(set(episode.support["segment"][is_new, 0].tolist())) > 1  # not all the unknown row
    i = int(np.flatnonzero(is_new)[0])
    assert taskset.user_features(i) == data.users.loc[taskset.user_ids[i]].to_dict()


def test_retrain_with_user_features_table(setup, tmp_path):
    model_dir, logs = setup
    data = metarec.datasets.synthetic(num_users=400, num_items=120, seed=5)
    features = data.users.reset_index()  # user_id column, integer ids; the log has strings
    features.to_csv(tmp_path / "users.csv", index=False)
    logs.to_parquet(tmp_path / "logs.parquet")
    code = main(["retrain", "--model-dir", str(model_dir), "--logs", str(tmp_path / "logs.parquet"),
                 "--user-features", str(tmp_path / "users.csv"), "--epochs", "3",
                 "--learning-rate", "3e-3", "--quiet"])
    assert code == 0
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]
    with pytest.raises(ValueError, match="lacks the model's user feature columns"):
        retrain(model_dir, logs, epochs=1, verbose=0, user_features=features.drop(columns=["age"]))


def test_retrain_and_score_batch_a_two_headed_catalogue_model(tmp_path):
    data = metarec.datasets.synthetic(num_users=300, num_items=100, seed=3)
    users = np.sort(data.interactions["user_id"].unique())
    early, late = users[:150], users[150:]
    first = metarec.InteractionData(data.interactions[data.interactions.user_id.isin(early)],
                                    data.users.loc[early], data.items)
    tasks = metarec.UserTasks(first, support_size=10)
    keras.utils.set_random_seed(0)
    learner = metarec.presets.catalogue_two_tower(tasks, embedding_dim=8, cosine_dim=2)
    model_dir = tmp_path / "models"
    (model_dir / "1").mkdir(parents=True)
    learner.save(model_dir / "1" / "model.keras")
    logs = data.interactions[data.interactions.user_id.isin(late)].astype({"user_id": str, "item_id": str})
    result = retrain(model_dir, logs, epochs=1, learning_rate=1e-3, margin=10.0, verbose=0)
    assert result.promoted and np.isfinite(result.new_metrics["mae"])
    new = metarec.load(model_dir / "2" / "model.keras")
    counts = new.objective.sampler.item_counts
    assert counts.sum() > 0 and not np.array_equal(counts, learner.objective.sampler.item_counts)
    # score-batch ranks by the ranking head, as recommend does.
    frame = logs.groupby("user_id").head(10).astype({"item_id": np.int64})
    frame.to_parquet(tmp_path / "in.parquet")
    code = main(["score-batch", "--model", str(model_dir / "2" / "model.keras"), "--interactions",
                 str(tmp_path / "in.parquet"), "--out", str(tmp_path / "out"), "--k", "5", "--quiet"])
    assert code == 0
    out = pd.read_parquet(tmp_path / "out")
    first_user = frame["user_id"].iloc[0]
    want = new.adapt(frame[frame.user_id == first_user][["item_id", "rating"]]).recommend(k=5)
    got = out[out["user_id"] == first_user].sort_values("rank")
    assert got["item_id"].astype(np.int64).tolist() == want["item_id"].tolist()


def test_retrain_promotes_and_serves_a_learned_update_rule(setup, tmp_path):
    """``LSTMMetaLearner``: retraining warm-starts the update rule too, and the promoted
    version loads and adapts like any other."""
    from metarec.learned_optimizer import LSTMMetaLearner

    _, logs = setup
    data = metarec.datasets.synthetic(num_users=400, num_items=120, seed=5)
    early = np.sort(data.interactions["user_id"].unique())[:150]
    tasks = metarec.UserTasks(metarec.InteractionData(
        data.interactions[data.interactions.user_id.isin(early)], data.users.loc[early], data.items),
        support_size=10)
    keras.utils.set_random_seed(0)
    model = metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16,))
    learner = LSTMMetaLearner(model, inner_steps=2, hidden_size=4, feedback="explicit")
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.fit(tasks.train, epochs=1, verbose=0)
    lstm_dir = tmp_path / "lstm-models"
    (lstm_dir / "1").mkdir(parents=True)
    learner.save(lstm_dir / "1" / "model.keras")
    result = retrain(lstm_dir, logs, epochs=2, learning_rate=3e-3, margin=10.0, verbose=0)
    assert result.promoted and result.new_version == 2 and np.isfinite(result.new_metrics["mae"])
    new = metarec.load(lstm_dir / "2" / "model.keras")
    assert isinstance(new, LSTMMetaLearner) and new.hidden_size == 4
    moved = [not np.allclose(a, b) for a, b in zip(new.update_rule.get_weights(), learner.update_rule.get_weights())]
    assert any(moved)  # the rule itself was meta-trained again
    support = pd.DataFrame({"item_id": [1, 2, 3], "rating": [5.0, 1.0, 4.0]})
    scores = new.adapt(support).score([4, 5, 6])
    assert np.all(np.isfinite(scores)) and not np.allclose(scores, new.predict_items([4, 5, 6]))
