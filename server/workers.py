"""Several server processes on one port: ``metarec serve --workers N``.

Why: one server process is one Python interpreter. Its event loop (gRPC, validation, replies)
and its model thread share one GIL, so under load it keeps only part of a second core busy;
the model maths itself is cheaper than the Python around it (figures in docs/BENCHMARKS.md).
Several processes, one interpreter each, use the cores a single process leaves idle.

How: the supervisor (:class:`WorkerPool`, no Keras imported) reserves the port, creates the
interaction log once (so that workers never race to switch it to WAL mode), then starts N
``python -m metarec_server.main`` workers with ``--reuse-port``: each binds the same port with
``SO_REUSEPORT`` and Linux spreads new *connections* across them (a connection, hence a client
channel, stays with one worker). It prints ``metarec server listening on HOST:PORT`` once every
worker listens, restarts a worker that dies, and on SIGINT / SIGTERM stops them all gracefully
(each worker finishes its in-flight calls). Workers also stop on their own when the supervisor
disappears, even by SIGKILL (they watch their parent process id).

What differs from one process:

* each worker loads model versions itself: during a hot reload, workers can answer from
  different versions for up to one poll interval (every answer names its version);
* the adapted-user cache is per worker;
* the interaction log is one SQLite file written by all (WAL mode takes writers from several
  processes; an acknowledged row is committed whichever worker took it).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger(__name__)

READY_PREFIX = "metarec server listening on "


def reserve_port(host: str, port: int) -> socket.socket:
    """Hold ``host:port`` for a worker pool; returns the bound (not listening) socket.

    A plain bind first proves the port is free: with ``SO_REUSEPORT`` alone the pool could
    join another server of the same user on that port and split its traffic. ``port=0`` picks
    a free port (``sock.getsockname()[1]``). Keep the socket open while the pool runs: no
    other program can take the port, and a restarted worker can bind it again.
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("several workers need SO_REUSEPORT, which this platform does not have")
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    for _ in range(5 if port == 0 else 1):
        probe = socket.socket(family, kind, proto)
        try:
            probe.bind(address)
            chosen = probe.getsockname()
        except OSError as error:
            raise ValueError(f"cannot bind {host}:{port}: {error.strerror}") from None
        finally:
            probe.close()
        hold = socket.socket(family, kind, proto)
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            hold.bind(chosen)
            return hold
        except OSError as error:
            hold.close()  # another program took the port between the two binds
            last = error
    raise ValueError(f"cannot bind {host}:{port}: {last.strerror}")


class WorkerPool:
    """Start, watch and stop ``workers`` copies of ``command`` (a ``metarec_server.main`` command
    line that binds a shared port and prints the listening line when it accepts connections).

    Args:
        command: the worker command line (the same for every worker).
        workers: how many.
        env: the workers' environment (default: this process's).
        start_timeout_s: how long a worker may take to print its listening line.
        stop_timeout_s: how long a worker may take to drain after SIGTERM before SIGKILL.
        max_restarts: restarts allowed within ``restart_window_s``; a worker dying more often
            than that stops the pool (exit status 1) instead of crash-looping.
        on_exit: ``on_exit(pid)``, called once for each worker process seen to have exited
            (the supervisor's metrics forget its live gauges).
    """

    def __init__(
        self,
        command: Sequence[str],
        workers: int,
        *,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 120.0,
        stop_timeout_s: float = 75.0,
        restart_delay_s: float = 1.0,
        max_restarts: int = 5,
        restart_window_s: float = 60.0,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.command = list(command)
        self.workers = workers
        self.env = dict(env) if env is not None else None
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.restart_delay_s = restart_delay_s
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self._on_exit = on_exit
        self.procs: list[subprocess.Popen | None] = [None] * workers
        self._restarts: deque[float] = deque()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.failed = False

    # ------------------------------------------------------------------ one worker
    def _spawn(self, index: int) -> subprocess.Popen:
        """Start worker ``index`` and wait for its listening line (RuntimeError otherwise)."""
        proc = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE, text=True)
        ready = threading.Event()

        def read_stdout() -> None:
            # Drains the pipe for the worker's whole life, so it can never block on stdout.
            for line in proc.stdout:
                if line.startswith(READY_PREFIX):
                    ready.set()
                elif line.strip():
                    log.info("worker %d: %s", index, line.rstrip())

        threading.Thread(target=read_stdout, name=f"metarec-worker-{index}-stdout", daemon=True).start()
        deadline = time.monotonic() + self.start_timeout_s
        while not ready.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline or self._stop.is_set():
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                raise RuntimeError(f"worker {index} did not start (exit status {proc.returncode})")
        log.info("worker %d listening (pid %d)", index, proc.pid)
        return proc

    # ------------------------------------------------------------------ pool
    def start(self) -> None:
        """Start every worker; on any failure stop those already running and raise."""
        try:
            for index in range(self.workers):
                self.procs[index] = self._spawn(index)
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self._watch, name="metarec-worker-watch", daemon=True).start()

    def _watch(self) -> None:
        """Restart workers that exit while the pool is running.

        Should the watcher meet an error it does not expect, the pool fails and stops (the
        supervisor exits non-zero) rather than running on with fewer workers and no watcher.
        """
        try:
            self._watch_loop()
        except Exception:  # noqa: BLE001 - reported, then the pool stops
            log.exception("the worker watcher failed: stopping")
            self.failed = True
            self._stop.set()

    def _watch_loop(self) -> None:
        while not self._stop.wait(0.2):
            for index, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None or self._stop.is_set():
                    continue
                log.warning("worker %d (pid %d) exited with status %s", index, proc.pid, proc.returncode)
                self._exited(proc.pid)
                now = time.monotonic()
                while self._restarts and now - self._restarts[0] > self.restart_window_s:
                    self._restarts.popleft()
                if len(self._restarts) >= self.max_restarts:
                    log.error("%d worker restarts within %.0f s: stopping", len(self._restarts), self.restart_window_s)
                    self.failed = True
                    self._stop.set()
                    return
                self._restarts.append(now)
                if self._stop.wait(self.restart_delay_s):
                    return
                try:
                    with self._lock:
                        if not self._stop.is_set():
                            self.procs[index] = self._spawn(index)
                except (RuntimeError, OSError) as error:
                    if self._stop.is_set():
                        return  # the pool is stopping: the starting worker was ended on purpose
                    # RuntimeError: it exited or timed out before listening; OSError: fork or
                    # exec failed (no memory, too many processes). Either way it counts as a
                    # restart and the next pass tries again, so the watcher itself never dies.
                    log.error("worker %d could not be restarted: %s", index, error)

    def _exited(self, pid: int) -> None:
        if self._on_exit is None:
            return
        try:
            self._on_exit(pid)
        except Exception:  # noqa: BLE001 - bookkeeping must not stop the pool
            log.exception("on_exit hook failed for pid %d", pid)

    def pids(self) -> list[int]:
        """Process ids of the workers currently running."""
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self) -> None:
        """Block until :meth:`request_stop` (a signal handler calls it) or a failure."""
        # Short waits: signal handlers run on the main thread between them.
        while not self._stop.wait(0.2):
            pass

    def stop(self) -> int:
        """SIGTERM every worker, wait for them to drain, SIGKILL stragglers; exit status."""
        self._stop.set()
        with self._lock:
            # A worker that died earlier was reported (and would have been restarted) by the
            # watcher; the exit status says whether the running ones drained cleanly.
            running = [p for p in self.procs if p is not None and p.poll() is None]
            for proc in running:
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            clean = True
            for proc in running:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.error("worker pid %d did not stop in %.0f s: killing it", proc.pid, self.stop_timeout_s)
                    proc.kill()
                    proc.wait()
                self._exited(proc.pid)
                clean = clean and proc.returncode == 0
        return 1 if self.failed or not clean else 0


def watch_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """In a worker: SIGTERM this process (a graceful stop) once ``parent_pid`` is gone.

    Runs on a daemon thread. ``os.getppid()`` changes when the parent dies (the worker is
    re-parented), which also covers a parent killed by SIGKILL.
    """

    def loop() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        log.warning("supervisor (pid %d) is gone: stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, name="metarec-parent-watch", daemon=True).start()
