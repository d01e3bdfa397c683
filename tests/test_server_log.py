"""The durable interaction log, in both stores (SQLite and PostgreSQL): reads, ordering, export,
idempotent writes, and a kill -9 of a real server followed by a retry of every call.

PostgreSQL cases need $METAREC_TEST_POSTGRES_DSN (tests/conftest.py; .ci/run sets it).
"""

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
from metarec.interaction_log import InteractionLog, RequestIdConflictError, open_interaction_log

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


def test_user_interactions_in_time_order_and_most_recent_with_limit(log_location):
    with open_interaction_log(log_location) as store:
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


def test_missing_timestamp_is_the_receive_time(log_location):
    with open_interaction_log(log_location) as store:
        store.append("u", [("a", 1.0, None)], now=1234.9)
        assert store.user_interactions("u")[0].timestamp == 1234


def test_invalid_rows_store_nothing(log_location):
    with open_interaction_log(log_location) as store:
        with pytest.raises(ValueError):
            store.append("u", [("a", 1.0, 1), ("b", float("nan"), 2)])
        with pytest.raises(ValueError):
            store.append("u", [("", 1.0, 1)])
        with pytest.raises(ValueError):
            store.append("", [("a", 1.0, 1)])
        assert store.count() == 0


def test_export_to_pandas_for_retraining(log_location):
    with open_interaction_log(log_location) as store:
        store.append("u1", [("10", 4.0, 100)], now=1000.0)
        store.append("u2", [("11", 2.5, 50), ("12", 3.0, 60)], now=2000.0)
        frame = store.to_pandas()
        assert list(frame.columns) == ["user_id", "item_id", "rating", "timestamp", "logged_at"]
        assert frame["item_id"].tolist() == ["10", "11", "12"]
        assert str(frame["rating"].dtype) == "float64" and str(frame["timestamp"].dtype) == "int64"
        assert store.to_pandas(since=1500.0)["user_id"].tolist() == ["u2", "u2"]
        assert store.to_pandas(users=["u1"])["item_id"].tolist() == ["10"]
        assert store.to_pandas(users=[]).empty


def test_concurrent_writers_and_readers(log_location):
    with open_interaction_log(log_location) as store:
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


def test_closed_log_refuses_work(log_location):
    store = open_interaction_log(log_location)
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError):
        store.append("u", [("a", 1.0, 1)])


def test_a_repeated_request_id_stores_nothing_new(log_location):
    with open_interaction_log(log_location) as store:
        first = store.write("u", [("a", 4.0, 10), ("b", 2.0, None)], now=500.0, request_id="req-1")
        assert (first.stored, first.replayed) == (2, False)
        # The retry comes later (another receive time): same contents, same id.
        again = store.write("u", [("a", 4.0, 10), ("b", 2.0, None)], now=900.0, request_id="req-1")
        assert (again.stored, again.replayed) == (2, True)
        assert [(r.item_id, r.timestamp) for r in store.user_interactions("u")] == [("a", 10), ("b", 500)]
        # Another id (or none) stores the same rows again: ids, not contents, make calls equal.
        assert store.write("u", [("a", 4.0, 10)], request_id="req-2").stored == 1
        assert store.append("u", [("a", 4.0, 10)]) == 1
        assert store.count() == 4
        with pytest.raises(RequestIdConflictError, match="req-1"):
            store.write("u", [("a", 5.0, 10), ("b", 2.0, None)], request_id="req-1")
        with pytest.raises(RequestIdConflictError):
            store.write("someone-else", [("a", 4.0, 10), ("b", 2.0, None)], request_id="req-1")
        assert store.count() == 4


def test_concurrent_retries_of_one_request_store_it_once(log_location):
    with open_interaction_log(log_location) as store:
        outcomes, errors = [], []

        def send():
            try:
                for i in range(20):
                    outcomes.append(store.write("u", [(f"item-{i}", 1.0, i)], request_id=f"call-{i}"))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert store.count() == 20
        assert sum(not o.replayed for o in outcomes) == 20 and sum(o.replayed for o in outcomes) == 60


def test_logs_written_by_one_handle_are_read_by_another(log_location):
    """What replicas rely on: rows committed through one connection are visible to a second
    store opened on the same location (another process or host in production)."""
    with open_interaction_log(log_location) as writer, open_interaction_log(log_location) as reader:
        assert reader.user_interactions("u") == []
        writer.append("u", [("a", 3.0, 1)])
        assert [r.item_id for r in reader.user_interactions("u")] == ["a"]
        assert reader.to_pandas()["item_id"].tolist() == ["a"]


# ---------------------------------------------------------------------------- kill -9
def start_server(tmp_path, log_location):
    """A real server process (no model: logging must not need one) on a free port."""
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "metarec_server.main",
            "--model-dir", str(tmp_path / "models"),
            "--port", "0",
            "--log", log_location,
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


def log_request(user, items, request_id):
    return pb.LogInteractionsRequest(
        user_id=user, interactions=[pb.Interaction(item_id=it, rating=1.0) for it in items], request_id=request_id
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_every_acknowledged_row_survives_kill_9_and_retries_store_nothing_twice(tmp_path, log_location):
    proc, port = start_server(tmp_path, log_location)
    sent = []  # (user, items, request id) of every call sent, answered or not
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
                with lock:
                    sent.append((user, items, f"req-{w}-{i}"))
                try:
                    reply = stub.LogInteractions(log_request(user, items, f"req-{w}-{i}"), timeout=5)
                except grpc.RpcError:
                    return  # the server died mid-call: this batch was never acknowledged
                assert reply.stored == 3 and not reply.replayed
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

    # Restart on the same log: it must open (recovery) and hold every acknowledged row.
    proc, port = start_server(tmp_path, log_location)
    try:
        with open_interaction_log(log_location) as store:
            frame = store.to_pandas()
        stored = set(zip(frame["user_id"], frame["item_id"]))
        missing = [row for row in acknowledged if row not in stored]
        assert not missing, f"{len(missing)} acknowledged rows lost, e.g. {missing[:3]}"
        # A batch is one transaction: no user has a partial batch of 3.
        assert (frame.groupby(frame["item_id"].str.rsplit("-", n=1).str[0]).size() == 3).all()

        # A client retries every call it sent, acknowledged or not, under its request id:
        # the acknowledged ones store nothing new, and each row ends up in the log once.
        acked_ids = {items[0] for user, items, _ in sent if (user, items[0]) in set(acknowledged)}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            for user, items, request_id in sent:
                reply = stub.LogInteractions(log_request(user, items, request_id), timeout=10)
                assert reply.stored == 3
                if items[0] in acked_ids:
                    assert reply.replayed, f"{request_id} was acknowledged before the kill"
            with pytest.raises(grpc.RpcError) as reused:
                stub.LogInteractions(log_request("user-0", ["other"], sent[0][2]), timeout=10)
            assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
            reply = stub.LogInteractions(
                pb.LogInteractionsRequest(user_id="after", interactions=[pb.Interaction(item_id="x", rating=2.0)]),
                timeout=5,
            )
            assert reply.stored == 1 and not reply.replayed
        with open_interaction_log(log_location) as store:
            frame = store.to_pandas()
        assert len(frame) == 3 * len(sent) + 1
        assert not frame.duplicated(["user_id", "item_id"]).any()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # graceful shutdown exits cleanly


# ---------------------------------------------------------------------------- PostgreSQL only
def test_postgres_store_says_when_its_database_is_away(tmp_path):
    from tests.conftest import fresh_postgres_database, postgres_admin_url

    import psycopg

    admin = postgres_admin_url()
    databases = fresh_postgres_database()
    url = next(databases)
    store = open_interaction_log(url)
    try:
        assert store.append("u", [("a", 1.0, 1)]) == 1
        with psycopg.connect(admin, autocommit=True) as conn:  # every session of the log ends
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                         (url.rsplit("/", 1)[1],))
        with pytest.raises(ConnectionError, match="interaction log postgresql://.* unavailable"):
            store.append("u", [("b", 1.0, 2)])
        # The next call opens a new connection: nothing acknowledged was lost.
        assert store.append("u", [("b", 1.0, 2)]) == 1
        assert [r.item_id for r in store.user_interactions("u")] == ["a", "b"]
    finally:
        store.close()
        next(databases, None)

    # A server given a database it cannot reach exits at once with a message.
    unreachable = url.rsplit("/", 1)[0] + "/no_such_database"
    done = subprocess.run(
        [sys.executable, "-m", "metarec_server.main", "--model-dir", str(tmp_path / "models"),
         "--port", "0", "--log", unreachable],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "interaction log postgresql://" in done.stderr and "no_such_database" in done.stderr
