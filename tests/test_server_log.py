"""The durable interaction log: SQLite settings, reads, export, and a kill -9 of a real server."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from metarec.api.v1 import recommender_pb2 as pb
from metarec.api.v1 import recommender_pb2_grpc as pb_grpc
from metarec.interaction_log import InteractionLog

ROOT = Path(__file__).resolve().parent.parent


def test_database_is_wal_with_full_synchronous_commits(tmp_path):
    with InteractionLog(tmp_path / "log.sqlite") as store:
        assert store._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        store.append("u", [("i", 1.0, 5)])
        assert store._reader().execute("PRAGMA synchronous").fetchone()[0] == 2
    # WAL mode is a property of the file: another connection sees it too.
    conn = sqlite3.connect(tmp_path / "log.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_user_interactions_in_time_order_and_most_recent_with_limit(tmp_path):
    with InteractionLog(tmp_path / "log.sqlite") as store:
        assert store.append("u1", [("a", 5.0, 300), ("b", 4.0, 100)]) == 2
        store.append("u2", [("c", 1.0, 200)])
        store.append("u1", [("d", 3.0, 200)])
        assert [r.item_id for r in store.user_interactions("u1")] == ["b", "d", "a"]
        assert [(r.item_id, r.rating, r.timestamp) for r in store.user_interactions("u1", limit=2)] == [
            ("d", 3.0, 200),
            ("a", 5.0, 300),
        ]
        assert store.user_interactions("nobody") == []
        assert store.count() == 4


def test_missing_timestamp_is_the_receive_time(tmp_path):
    with InteractionLog(tmp_path / "log.sqlite") as store:
        store.append("u", [("a", 1.0, None)], now=1234.9)
        assert store.user_interactions("u")[0].timestamp == 1234


def test_invalid_rows_store_nothing(tmp_path):
    with InteractionLog(tmp_path / "log.sqlite") as store:
        with pytest.raises(ValueError):
            store.append("u", [("a", 1.0, 1), ("b", float("nan"), 2)])
        with pytest.raises(ValueError):
            store.append("u", [("", 1.0, 1)])
        with pytest.raises(ValueError):
            store.append("", [("a", 1.0, 1)])
        assert store.count() == 0


def test_export_to_pandas_for_retraining(tmp_path):
    with InteractionLog(tmp_path / "log.sqlite") as store:
        store.append("u1", [("10", 4.0, 100)], now=1000.0)
        store.append("u2", [("11", 2.5, 50), ("12", 3.0, 60)], now=2000.0)
        frame = store.to_pandas()
        assert list(frame.columns) == ["user_id", "item_id", "rating", "timestamp", "logged_at"]
        assert frame["item_id"].tolist() == ["10", "11", "12"]
        assert str(frame["rating"].dtype) == "float64" and str(frame["timestamp"].dtype) == "int64"
        assert store.to_pandas(since=1500.0)["user_id"].tolist() == ["u2", "u2"]
        assert store.to_pandas(users=["u1"])["item_id"].tolist() == ["10"]
        assert store.to_pandas(users=[]).empty


def test_concurrent_writers_and_readers(tmp_path):
    with InteractionLog(tmp_path / "log.sqlite") as store:
        errors = []

        def write(user):
            try:
                for i in range(50):
                    store.append(user, [(str(i), 1.0, i)])
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        def read():
            try:
                for _ in range(50):
                    store.user_interactions("w0")
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=write, args=(f"w{i}",)) for i in range(4)]
        threads += [threading.Thread(target=read) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert store.count() == 200


def test_closed_log_refuses_work(tmp_path):
    store = InteractionLog(tmp_path / "log.sqlite")
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError):
        store.append("u", [("a", 1.0, 1)])


# ---------------------------------------------------------------------------- kill -9
def start_server(tmp_path):
    """A real server process (no model: logging must not need one) on a free port."""
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "metarec_server.main",
            "--model-dir", str(tmp_path / "models"),
            "--port", "0",
            "--log-db", str(tmp_path / "log.sqlite"),
            "--log-level", "WARNING",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # "metarec server listening on 127.0.0.1:PORT"
    if not line.startswith("metarec server listening on"):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()}")
    return proc, line.strip().rsplit(":", 1)[1]


def test_every_acknowledged_row_survives_kill_9(tmp_path):
    proc, port = start_server(tmp_path)
    acknowledged = []  # (user, item) pairs whose LogInteractions call returned OK
    lock = threading.Lock()
    stop = threading.Event()

    def writer(w):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            i = 0
            while not stop.is_set():
                user = f"user-{w}"
                items = [f"{w}-{i}-{j}" for j in range(3)]
                request = pb.LogInteractionsRequest(
                    user_id=user, interactions=[pb.Interaction(item_id=it, rating=1.0) for it in items]
                )
                try:
                    reply = stub.LogInteractions(request, timeout=5)
                except grpc.RpcError:
                    return  # the server died mid-call: this batch was never acknowledged
                assert reply.stored == 3
                with lock:
                    acknowledged.extend((user, it) for it in items)
                i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while len(acknowledged) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # writers are still sending: calls are in flight
        proc.wait(timeout=10)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 300

    # Restart on the same database: it must open (WAL recovery) and hold every acked row.
    proc, port = start_server(tmp_path)
    try:
        with InteractionLog(tmp_path / "log.sqlite") as store:
            frame = store.to_pandas()
        stored = set(zip(frame["user_id"], frame["item_id"]))
        missing = [row for row in acknowledged if row not in stored]
        assert not missing, f"{len(missing)} acknowledged rows lost, e.g. {missing[:3]}"
        # A batch is one transaction: no user has a partial batch of 3.
        assert (frame.groupby(frame["item_id"].str.rsplit("-", n=1).str[0]).size() == 3).all()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            reply = stub.LogInteractions(
                pb.LogInteractionsRequest(user_id="after", interactions=[pb.Interaction(item_id="x", rating=2.0)]),
                timeout=5,
            )
            assert reply.stored == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # graceful shutdown exits cleanly
