"""The retraining loop end to end, as a user runs it, with real components only.

Version 1 of a model serves; new users' interactions are logged through the SDK client into
the server's SQLite log; ``metarec retrain`` (the command line, in a subprocess) reads that log
and publishes version 2; the running server swaps it in by itself, and those users then get
better predictions for the interactions they had *after* the logged ones (never logged, never
trained on). A retrain that makes the model worse is refused and the server keeps version 2.

Version 1 and the new users come from ``tests.test_retrain``'s ``setup`` fixture: a MAML
model meta-trained for one epoch on the first 150 users of ``synthetic(seed=5)``, and the
interactions of the 250 later users, none of whom it has seen.
"""

import concurrent.futures
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

pytest.importorskip("keras")
pytest.importorskip("metarec")

from metarec.client import Client  # noqa: E402
from metarec_server.app import ServerConfig  # noqa: E402
from metarec_server.background import BackgroundServer  # noqa: E402
from metarec_server.batcher import BatcherConfig  # noqa: E402
from metarec_server.inference import make_check  # noqa: E402
from tests.test_retrain import setup  # noqa: E402, F401  (fixture: version 1 and the new users' logs)

POLL_S = 0.2  # the server's model-folder poll interval
HELD_OUT = 0.3  # each new user's latest interactions kept out of the log
K = 10
CLI_TIMEOUT_S = 600


def split_by_time(logs, held_out=HELD_OUT):
    """Each user's earlier interactions (to log) and their later ones (held out)."""
    logs = logs.sort_values(["user_id", "timestamp"], kind="stable")
    rank = logs.groupby("user_id").cumcount()
    size = logs.groupby("user_id")["item_id"].transform("size")
    later = rank >= size - np.ceil(size * held_out).astype(int)
    return logs[~later], logs[later]


def metarec_cli(*args):
    """``metarec ARGS`` in a subprocess, through the installed console script."""
    exe = shutil.which("metarec", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "metarec.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


def served_version(client):
    return client.model_status()[0]["version"]


def wait_for_version(client, version, timeout=180):
    deadline = time.monotonic() + timeout
    while served_version(client) != version and time.monotonic() < deadline:
        time.sleep(POLL_S / 2)
    return served_version(client)


def recommendations(client, users):
    """Top-K of each user, adapted by the server to the user's logged interactions."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return dict(zip(users, pool.map(lambda u: client.recommend(user_id=u, k=K), users)))


def held_out_scores(client, held_out):
    """The server's scores of each user's held-out items (adapted to their logged ones)."""
    groups = [(u, rows["item_id"].tolist()) for u, rows in held_out.groupby("user_id")]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda g: client.score(candidates=g[1], user_id=g[0]), groups))
    for (_, items), reply in zip(groups, replies):
        assert [str(i) for i in reply.item_ids] == items
    return replies


def held_out_mae(held_out, replies):
    predicted = np.concatenate([r.scores for r in replies]).astype(np.float64)
    truth = np.concatenate([rows["rating"].to_numpy(np.float64)
                            for _, rows in held_out.groupby("user_id")])
    assert predicted.shape == truth.shape and np.all(np.isfinite(predicted))
    return float(np.mean(np.abs(np.clip(predicted, 1.0, 5.0) - truth)))


def report_table(stdout):
    """``{metric: (current, retrained)}`` from the comparison ``metarec retrain`` prints."""
    rows = re.findall(r"^\| (\S+) \| (\S+) \| (\S+) \|$", stdout, flags=re.M)
    return {m: (float(a), float(b)) for m, a, b in rows if m != "metric"}


def test_log_retrain_hot_swap_and_gate(setup, tmp_path):
    model_dir, logs = setup
    logged, held_out = split_by_time(logs)
    users = sorted(logged["user_id"].unique())
    assert len(users) == 250 and held_out["user_id"].nunique() == 250
    # The held-out interactions really are each user's latest ones.
    assert (held_out.groupby("user_id")["timestamp"].min()
            > logged.groupby("user_id")["timestamp"].max()).all()

    log_path = tmp_path / "interactions.sqlite"
    config = ServerConfig(
        model_dir=model_dir,
        port=0,
        log_path=log_path,
        poll_interval_s=POLL_S,
        batching=BatcherConfig(max_batch_size=16, max_delay_s=0.002),
        check=make_check(batch_sizes=(1, 16), support_sizes=(5,)),
    )
    with BackgroundServer(config) as server, Client(server.address, timeout=120) as client:
        assert server.serving and served_version(client) == 1

        # 1. The new users' interactions reach the log through the API.
        for user, rows in logged.groupby("user_id"):
            assert client.log_interactions(user, rows[["item_id", "rating", "timestamp"]]) == len(rows)
        assert server.server.interaction_log.count() == len(logged)

        # 2. What version 1 answers for them.
        recs_v1 = recommendations(client, users)
        assert {r.model_version for r in recs_v1.values()} == {1}
        scores_v1 = held_out_scores(client, held_out)
        assert {r.model_version for r in scores_v1} == {1}
        mae_v1 = held_out_mae(held_out, scores_v1)

        # 3. Retrain from the server's own log, as a user would.
        report = tmp_path / "report"
        run = metarec_cli("retrain", "--model-dir", model_dir, "--logs", log_path, "--epochs", 6,
                          "--learning-rate", 3e-3, "--gate-metric", "mae", "--report", report,
                          "--seed", 0, "--quiet")
        assert run.returncode == 0, run.stdout + run.stderr
        assert "promoted as version 2" in run.stdout
        gate = report_table(run.stdout)
        assert gate["mae"][1] <= gate["mae"][0], run.stdout
        assert (model_dir / "2" / "model.keras").is_file()
        assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]  # no staging left over
        assert "promoted as version 2" in (report / "report.md").read_text()
        assert (report / "learning_curves.png").stat().st_size > 1000

        # 4. The running server swaps version 2 in by itself; the same users now get
        # different recommendations and better predictions of what they did next.
        assert wait_for_version(client, 2) == 2
        assert not server.server.registries["default"].refused
        recs_v2 = recommendations(client, users)
        assert {r.model_version for r in recs_v2.values()} == {2}
        for user in users:
            assert not np.allclose(recs_v2[user].scores, recs_v1[user].scores, atol=1e-4), (
                f"user {user}: version 2 recommends exactly like version 1")
        changed = sum(recs_v2[u].item_ids != recs_v1[u].item_ids for u in users)
        assert changed >= len(users) // 2, f"only {changed} of {len(users)} top-{K} lists changed"
        scores_v2 = held_out_scores(client, held_out)
        assert {r.model_version for r in scores_v2} == {2}
        mae_v2 = held_out_mae(held_out, scores_v2)
        assert mae_v2 < mae_v1, (mae_v1, mae_v2)

        # 5. A retrain that makes the model worse (an absurd outer learning rate) is refused
        # by the strict gate: non-zero exit, the comparison printed, no version 3.
        run = metarec_cli("retrain", "--model-dir", model_dir, "--logs", log_path, "--epochs", 1,
                          "--learning-rate", 5.0, "--margin", 0, "--gate-metric", "mae",
                          "--seed", 0, "--quiet")
        assert run.returncode == 1, run.stdout + run.stderr
        assert "Retrain of version 2: refused" in run.stdout
        gate = report_table(run.stdout)
        assert {"mae", "rmse", "loss"} <= set(gate), run.stdout
        current, retrained = gate["mae"]
        assert not retrained <= current, run.stdout  # really worse (or not even finite)
        time.sleep(5 * POLL_S)  # a few watcher polls
        assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]
        assert served_version(client) == 2
        again = client.recommend(user_id=users[0], k=K)
        assert again.model_version == 2 and again.item_ids == recs_v2[users[0]].item_ids
