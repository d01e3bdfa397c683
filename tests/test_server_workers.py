"""``metarec serve --workers N``: several real server processes on one port.

The pool tests start the real command line (a supervisor and its worker processes) and talk
to it over fresh loopback connections: the kernel hands each new connection to one worker.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest

from metarec.api.v1 import recommender_pb2 as pb
from metarec.api.v1 import recommender_pb2_grpc as pb_grpc
from metarec.interaction_log import InteractionLog
from metarec_server.workers import WorkerPool, reserve_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- the port
def test_reserved_port_is_shared_only_with_reuse_port_sockets():
    hold = reserve_port("127.0.0.1", 0)
    try:
        port = hold.getsockname()[1]
        assert port > 0
        plain = socket.socket()
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # another program cannot take it
        plain.close()
        shared = socket.socket()
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        shared.bind(("127.0.0.1", port))  # a worker can
        shared.close()
    finally:
        hold.close()


def test_a_port_in_use_is_refused_even_by_a_reuse_port_listener():
    # The case SO_REUSEPORT alone would get wrong: a server of the same user listening with
    # SO_REUSEPORT would silently share its port with the new pool.
    busy = socket.socket()
    busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"127.0.0.1:{port}"):
            reserve_port("127.0.0.1", port)
    finally:
        busy.close()


def test_cli_refuses_a_busy_port_and_bad_worker_counts(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        done = run_cli(tmp_path, "--workers", "2", "--port", str(port))
        assert done.returncode == 2 and f"cannot bind 127.0.0.1:{port}" in done.stderr
    finally:
        busy.close()
    done = run_cli(tmp_path, "--workers", "0")
    assert done.returncode == 2 and "--workers must be >= 1, got 0" in done.stderr


def run_cli(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "metarec_server.main", "--model-dir", str(tmp_path / "models"),
         "--log-db", str(tmp_path / "log.sqlite"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )


# ---------------------------------------------------------------------------- the supervisor
FAKE_WORKER = "print('metarec server listening on 127.0.0.1:1', flush=True); import time; time.sleep({})"


def test_a_crash_looping_worker_stops_the_pool_with_an_error():
    pool = WorkerPool([sys.executable, "-c", FAKE_WORKER.format(0.05)], 2,
                      restart_delay_s=0.01, max_restarts=3, restart_window_s=60)
    pool.start()
    started = time.monotonic()
    pool.wait()  # returns by itself: the watcher gives up after 3 restarts
    assert time.monotonic() - started < 30
    assert pool.failed
    assert pool.stop() == 1


def test_a_restart_that_cannot_even_exec_counts_as_a_failed_restart():
    # An OSError from fork/exec (here: the program is gone) must not end the watcher silently,
    # which would leave the pool running one worker short for good.
    pool = WorkerPool([sys.executable, "-c", FAKE_WORKER.format(60)], 1,
                      restart_delay_s=0.01, max_restarts=3, restart_window_s=60)
    pool.start()
    pool.command = ["/nonexistent/metarec-python"]
    pool.procs[0].kill()
    deadline = time.monotonic() + 30
    while not pool.failed and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.failed  # three failed restarts, then the pool gives up and says so
    assert pool.stop() == 1


def test_stop_ends_every_worker_and_a_failed_start_stops_the_started_ones(tmp_path):
    pool = WorkerPool([sys.executable, "-c", FAKE_WORKER.format(60)], 2)
    pool.start()
    workers = pool.procs[:]
    assert all(p.poll() is None for p in workers)
    pool.stop()
    assert all(p.poll() is not None for p in workers)

    # The first worker starts, the second exits with status 3 before listening.
    marker = tmp_path / "first"
    script = (
        "import pathlib, sys, time\n"
        f"p = pathlib.Path({str(marker)!r})\n"
        "if p.exists(): sys.exit(3)\n"
        "p.write_text(str(__import__('os').getpid()))\n"
        "print('metarec server listening on 127.0.0.1:1', flush=True)\n"
        "time.sleep(60)\n"
    )
    pool = WorkerPool([sys.executable, "-c", script], 2)
    with pytest.raises(RuntimeError, match=r"worker 1 did not start \(exit status 3\)"):
        pool.start()
    assert pool.procs[0].poll() is not None  # the started worker was stopped too


# ---------------------------------------------------------------------------- a real pool
@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    keras = pytest.importorskip("keras")
    metarec = pytest.importorskip("metarec")
    data = metarec.datasets.synthetic(seed=0)
    tasks = metarec.UserTasks(data, support_size=10)
    learner = metarec.MAML(metarec.models.rating_mlp(tasks.encoder), inner_steps=2, inner_lr=0.05,
                           adapt="decision_layers")
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.fit(tasks.train, epochs=1, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("trained") / "model.keras"
    learner.save(path)
    return path


def start_pool(tmp_path, workers=2):
    (tmp_path / "models").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "metarec_server.main", "--workers", str(workers), "--port", "0",
         "--model-dir", str(tmp_path / "models"), "--log-db", str(tmp_path / "log.sqlite"),
         "--max-batch-size", "2", "--poll-interval", "0.2", "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("metarec server listening on"):
        proc.kill()
        raise AssertionError(f"pool did not start: {line!r} {proc.stderr.read()[-3000:]}")
    return proc, line.strip().rsplit(" ", 1)[1]


def worker_pids(supervisor: int) -> set[int]:
    pids = set()
    for task in Path(f"/proc/{supervisor}/task").glob("*"):
        pids |= {int(p) for p in (task / "children").read_text().split()}
    return pids


def wait_for(condition, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def is_gone(pid):
    """Exited (a zombie has closed its sockets too)."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def fresh_call(address, method, request):
    """One call over a new connection (a local subchannel pool: no connection reuse)."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return getattr(pb_grpc.RecommenderServiceStub(channel), method)(request, timeout=60)


def log_request(user, item):
    return pb.LogInteractionsRequest(user_id=user, interactions=[pb.Interaction(item_id=item, rating=4.0)])


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT (Linux)")
def test_pool_serves_restarts_a_killed_worker_and_stops_cleanly(tmp_path, model_file):
    import metarec

    proc, address = start_pool(tmp_path)
    acknowledged = []
    try:
        first = wait_for(lambda: worker_pids(proc.pid) if len(worker_pids(proc.pid)) == 2 else None,
                         what="two workers")
        # Version 1 appears after the workers started: each worker's watcher loads it.
        tmp = tmp_path / "models" / ".tmp-1"
        tmp.mkdir()
        (tmp / "model.keras").write_bytes(model_file.read_bytes())
        os.rename(tmp, tmp_path / "models" / "1")

        # Recommend over fresh connections (spread over both workers) equals the SDK.
        sdk = metarec.load(model_file)
        support = pd.DataFrame({"item_id": [5, 17, 42, 99], "rating": [5.0, 4.0, 1.0, 3.0]})
        candidates = [3, 8, 17, 64, 128, 200]
        expected = sdk.adapt_many([support])[0].score(candidates)
        request = pb.ScoreRequest(
            user=pb.UserContext(interactions=[pb.Interaction(item_id=str(i), rating=r)
                                              for i, r in zip(support["item_id"], support["rating"])]),
            candidate_item_ids=[str(c) for c in candidates],
        )

        def score_everywhere():
            try:
                replies = [fresh_call(address, "Score", request) for _ in range(12)]
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:  # a worker is still loading
                    return None
                raise
            return replies

        replies = wait_for(score_everywhere, timeout=300, what="both workers serving version 1")
        for reply in replies:
            assert reply.model.version == 1
            np.testing.assert_allclose(reply.scores, expected, rtol=1e-5, atol=1e-6)

        # Kill one worker: every new connection reaches the other one, and the supervisor
        # starts a replacement.
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        # Connections the kernel queued on the dying worker are reset (clients retry those);
        # once it is gone every new connection reaches the other worker.
        # Reaped by the supervisor: every thread has exited and the socket is closed.
        wait_for(lambda: victim not in worker_pids(proc.pid), what="the killed worker to exit")
        for i in range(10):
            assert fresh_call(address, "LogInteractions", log_request("a", f"a{i}")).stored == 1
            acknowledged.append(("a", f"a{i}"))
        replaced = wait_for(lambda: worker_pids(proc.pid) - first, what="a replacement worker")
        assert len(worker_pids(proc.pid)) == 2
        # Kill the other original worker: the replacement alone must now serve.
        survivor = (first - {victim}).pop()
        os.kill(survivor, signal.SIGKILL)
        wait_for(lambda: survivor not in worker_pids(proc.pid), what="the second killed worker to exit")
        for i in range(10):
            assert fresh_call(address, "LogInteractions", log_request("b", f"b{i}")).stored == 1
            acknowledged.append(("b", f"b{i}"))
        assert replaced <= worker_pids(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=120)
    assert status == 0, proc.stderr.read()[-3000:]
    # Every worker is gone, and every acknowledged row, whichever worker took it, is stored.
    with InteractionLog(tmp_path / "log.sqlite") as store:
        frame = store.to_pandas()
    assert set(zip(frame["user_id"], frame["item_id"])) == set(acknowledged)


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT (Linux)")
def test_workers_stop_on_their_own_when_the_supervisor_is_killed(tmp_path):
    proc, address = start_pool(tmp_path)
    workers = wait_for(lambda: worker_pids(proc.pid) if len(worker_pids(proc.pid)) == 2 else None,
                       what="two workers")
    assert fresh_call(address, "LogInteractions", log_request("u", "i")).stored == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)

    wait_for(lambda: all(is_gone(pid) for pid in workers), timeout=60, what="the orphaned workers to exit")
    # The port is free again: nothing of the pool is left listening.
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignores TIME_WAIT, not listeners
    probe.bind(("127.0.0.1", int(address.rsplit(":", 1)[1])))
    probe.close()


# ---------------------------------------------------------------------------- the client
def established_connections(port: int) -> int:
    """Client-side TCP connections to 127.0.0.1:``port`` (from /proc/net; gRPC may use
    IPv6 sockets with IPv4-mapped addresses)."""
    loopback = {f"0100007F:{port:04X}", f"0000000000000000FFFF00000100007F:{port:04X}"}
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[2] in loopback and fields[3] == "01":  # remote address, ESTABLISHED
                count += 1
    return count


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp (Linux)")
def test_client_spreads_calls_over_its_connections(tmp_path):
    from metarec.client import Client
    from metarec_server.app import ServerConfig
    from metarec_server.background import BackgroundServer

    config = ServerConfig(model_dir=tmp_path / "models", port=0, log_path=tmp_path / "log.sqlite",
                          check=lambda model: None)
    with BackgroundServer(config, wait_for_model=False) as running:
        for connections in (1, 3):
            with Client(running.address, connections=connections) as client:
                for i in range(2 * connections):
                    assert client.log_interactions(f"u{i}", [("i", 1.0)]) == 1
                assert established_connections(running.port) == connections
    with pytest.raises(ValueError, match="connections must be an integer >= 1, got 0"):
        Client("127.0.0.1:1", connections=0)


def test_workers_on_jax_share_a_compile_cache_that_is_removed_at_exit(tmp_path, model_file):
    """``--workers 2`` with no ``--compile-cache``: on JAX the supervisor gives its workers one
    temporary cache (filled by their compiles, so a restarted worker loads instead of
    compiling) and removes it when it stops; on TensorFlow, which keeps none, there is none."""
    from metarec.backend_choice import configured_backend

    (tmp_path / "models" / "1").mkdir(parents=True)
    (tmp_path / "models" / "1" / "model.keras").write_bytes(model_file.read_bytes())
    stderr = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "metarec_server.main", "--workers", "2", "--port", "0",
         "--model-dir", str(tmp_path / "models"), "--log-db", str(tmp_path / "log.sqlite"),
         "--log-level", "INFO"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )
    try:
        assert proc.stdout.readline().startswith("metarec server listening on")
        log = tmp_path / "stderr.txt"
        wait_for(lambda: log.read_text().count("serving version 1") == 2, what="both workers serving")
        shared = [line.split("workers share the compile cache ", 1)[1].split(" ", 1)[0]
                  for line in log.read_text().splitlines() if "workers share the compile cache" in line]
        if configured_backend()[0] != "jax":
            assert shared == []
            return
        assert len(shared) == 1, log.read_text()[-3000:]
        cache = Path(shared[0])
        assert cache.name.startswith("metarec-compile-cache-")
        assert any(path.is_file() for path in cache.rglob("*")), "nothing was compiled into the cache"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        stderr.close()
    assert not cache.exists()
