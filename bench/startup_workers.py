"""Start-up of ``metarec serve --workers N``: every worker to SERVING, and a killed worker back.

For each Keras backend it trains the quickstart-sized model (the gRPC bench's), starts the
server with ``--workers N`` (and ``--compile-cache`` unless ``--no-cache``), and reports, from
the server's own log lines and the clock of this script:

* ``listening_s``: process start -> the supervisor's "listening" line;
* ``serving_s``: process start -> each worker's "serving version" line, in order (the last
  one is when the whole pool serves);
* then one worker is killed with SIGKILL, and ``restart_serving_s`` is the time from the kill
  to the "serving version" line of the worker the supervisor started in its place (its
  restart delay, 1 s, included);
* ``health_after_restart``: whether 16 fresh connections in a row then got SERVING.

    python bench/startup_workers.py --backends jax,tensorflow --workers 2
    python bench/startup_workers.py --backends jax --workers 2 --json bench/results/startup_workers.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc_bench  # noqa: E402 - bench/grpc_bench.py: the model and the health wait
import machine  # noqa: E402

LISTENING = re.compile(r"worker (\d+) listening \(pid (\d+)\)")
SERVING = re.compile(r"\[(\d+)\] metarec_server\.registry: model '[^']+': serving version")


class LogWatch:
    """Lines of a growing log file, each with the time this process first saw it."""

    def __init__(self, path: Path):
        self.path, self.offset, self.lines = path, 0, []

    def poll(self) -> None:
        with open(self.path) as f:
            f.seek(self.offset)
            text = f.read()
        complete, _, _ = text.rpartition("\n")
        if complete:
            self.offset += len(complete) + 1
            now = time.perf_counter()
            self.lines += [(now, line) for line in complete.split("\n")]

    def wait_until(self, found, timeout: float):
        """Poll the log until ``found(lines)`` returns something truthy; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            result = found(self.lines)
            if result:
                return result
            time.sleep(0.02)
        raise TimeoutError(f"the awaited lines did not come in {self.path} within {timeout} s")


def matches(pattern, lines, since=0):
    """``(time seen, match)`` of every line from index ``since`` that ``pattern`` finds."""
    return [(seen, m) for seen, text in lines[since:] if (m := pattern.search(text))]


def bench_backend(backend: str, model_path: Path, workdir: Path, args) -> dict:
    model_dir = workdir / f"models-{backend}"
    (model_dir / "1").mkdir(parents=True)
    shutil.copy(model_path, model_dir / "1" / "model.keras")
    log = workdir / f"server-{backend}.log"
    command = [sys.executable, "-m", "metarec_server.main", "--model-dir", str(model_dir), "--port", "0",
               "--workers", str(args.workers), "--log-db", str(workdir / f"log-{backend}.sqlite"),
               "--log-level", "INFO"]
    if not args.no_cache:
        command += ["--compile-cache", str(workdir / f"compile-cache-{backend}")]
    env = dict(os.environ, KERAS_BACKEND=backend)
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline()
        listening = time.perf_counter() - t0
        address = line.strip().rsplit(" ", 1)[1]
        watch = LogWatch(log)
        started = watch.wait_until(lambda lines: len(found := matches(LISTENING, lines)) >= args.workers
                                   and found, 120)
        pids = {int(m.group(1)): int(m.group(2)) for _, m in started}
        ready = watch.wait_until(lambda lines: len(found := matches(SERVING, lines)) >= args.workers
                                 and found, 600)
        serving = [round(seen - t0, 2) for seen, _ in ready]
        grpc_bench.wait_serving(address, timeout=120, connections=16)
        # One worker killed: the supervisor starts another in its place.
        victim, mark = pids[0], len(watch.lines)
        killed = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        new_pid = watch.wait_until(lambda lines: next(
            (int(m.group(2)) for _, m in matches(LISTENING, lines, mark) if int(m.group(2)) != victim), None), 120)
        seen = watch.wait_until(lambda lines: next(
            (t for t, m in matches(SERVING, lines, mark) if int(m.group(1)) == new_pid), None), 600)
        restart = round(seen - killed, 2)
        grpc_bench.wait_serving(address, timeout=120, connections=16)
        loaded = [re.sub(r"^.*?\((loaded and checked in [0-9.]+ s)\).*$", r"\1", text)
                  for _, text in watch.lines if SERVING.search(text)]
        return {"backend": backend, "workers": args.workers, "compile_cache": not args.no_cache,
                "listening_s": round(listening, 2), "serving_s": serving,
                "restart_serving_s": restart, "health_after_restart": True, "load_logs": loaded}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="tensorflow,jax", help="comma-separated (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="server processes (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true",
                   help="start without --compile-cache (JAX workers then share the supervisor's "
                        "temporary one)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    results = {"machine": machine.describe(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="minutes"), "command": "python bench/startup_workers.py " + " ".join(argv or sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for backend in args.backends.split(","):
            model_path = workdir / f"model-{backend}.keras"
            subprocess.run([sys.executable, "-c", "import grpc_bench; from pathlib import Path; "
                            f"grpc_bench.train_model(Path({str(model_path)!r}))"],
                           cwd=ROOT / "bench", env=dict(os.environ, KERAS_BACKEND=backend), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[backend] = bench_backend(backend, model_path, workdir, args)
            print(backend, json.dumps(results[backend]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
