"""Start-up of ``metarec serve``: seconds from process start to SERVING, and the latency of the
first requests after it.

For each Keras backend it trains the quickstart-sized model (the gRPC bench's: MAML over a
2,000-item synthetic catalogue, 5 inner steps), then starts the server in a fresh process
``--starts`` times in a row with the same ``--compile-cache`` folder (the first start finds it
empty, the later ones find what the first compiled), and for each start reports:

* ``listening_s``: process start -> the "listening" line (imports, the port bound);
* ``serving_s``: process start -> health SERVING (model loaded, checked and warmed);
* ``load_log``: the server's own log line with the load-and-check time;
* after SERVING, ``--requests`` Recommend / Score calls over a mix that reaches many compiled
  shapes (1-32 concurrent clients, supports of 1-40 interactions, 10-2,000 candidates, and the
  whole catalogue): the first call's latency, the median, the p99, the maximum and how many took
  over 100 ms (in all, and at 1, 4 and 32 clients);
* ``warmed_s``: process start -> the server's log says the background warm-up ended;
* ``steady``: the same mix again after that, the machine's steady state for comparison.

With ``--load-while-warming``, 32 clients keep calling from the end of the mix until the
warm-up ends (the hardest case: full load on a machine that is still compiling), and
``while_warming`` reports those calls: how many took over 100 ms, in all and per 5-second
window since process start. ``steady_load`` is the same load for 20 s once warm: what the
machine gives at that load anyway.

    python bench/startup.py                          # both backends
    python bench/startup.py --backends jax --starts 2 --json bench/results/startup.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc_bench  # noqa: E402 - bench/grpc_bench.py: the model, the users, the health wait
import machine  # noqa: E402

NUM_ITEMS = 2000


def start(model_dir: Path, workdir: Path, backend: str, cache: Path | None, tag: str,
          serve_after_warm_up: bool = False):
    """The server in a fresh process; returns (process, address, listening seconds, t0, log)."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    log = workdir / f"server-{backend}-{tag}.log"
    command = [sys.executable, "-m", "metarec_server.main", "--model-dir", str(model_dir),
               "--port", "0", "--log-db", str(workdir / f"log-{backend}-{tag}.sqlite"),
               "--log-level", "INFO"]
    if cache is not None:
        command += ["--compile-cache", str(cache)]
    if serve_after_warm_up:
        command += ["--serve-after-warm-up"]
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    listening = time.perf_counter() - t0
    if not line.startswith("metarec server listening on"):
        proc.kill()
        raise RuntimeError(f"server did not start ({backend}): {line!r}; see {log}")
    return proc, line.strip().rsplit(" ", 1)[1], listening, t0, log


def request_mix(n: int, seed: int):
    """Recommend and Score requests of many shapes (support size, candidate count, whole
    catalogue), so that the calls after SERVING reach the shapes real traffic reaches."""
    from metarec.api.v1 import recommender_pb2 as pb

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = int(rng.integers(1, 41))
        count = int(rng.choice([10, 50, 100, 300, 1000, 2000]))
        picks = rng.choice(np.arange(1, NUM_ITEMS + 1), size=size + min(count, NUM_ITEMS - size), replace=False)
        user = pb.UserContext(interactions=[
            pb.Interaction(item_id=str(item), rating=float(rng.integers(1, 6))) for item in picks[:size]])
        candidates = [] if i % 7 == 3 else [str(c) for c in picks[size:]]  # some: the whole catalogue
        if i % 3 == 2:
            out.append(("Score", pb.ScoreRequest(user=user, candidate_item_ids=candidates)))
        else:
            out.append(("Recommend", pb.RecommendRequest(user=user, candidate_item_ids=candidates, k=10)))
    return out


async def timed_calls(address: str, requests, clients: int):
    import grpc

    from metarec.api.v1 import recommender_pb2_grpc as pb_grpc

    latencies = [0.0] * len(requests)
    queue = asyncio.Queue()
    for item in enumerate(requests):
        queue.put_nowait(item)

    async def client():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            while not queue.empty():
                i, (method, request) = queue.get_nowait()
                t = time.perf_counter()
                await getattr(stub, method)(request, timeout=120)
                latencies[i] = time.perf_counter() - t

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def after_serving(address: str, n: int) -> dict:
    """The first call alone, then the mix at 1, 4 and 32 concurrent clients."""
    requests = request_mix(n, seed=5)
    first = asyncio.run(timed_calls(address, requests[:1], 1))
    rest = requests[1:]
    third = len(rest) // 3
    latencies = first[:]
    for clients, part in ((1, rest[:third]), (4, rest[third:2 * third]), (32, rest[2 * third:])):
        latencies += asyncio.run(timed_calls(address, part, clients))
    ms = np.asarray(latencies) * 1e3
    levels = np.cumsum([1, third, third])  # where the 4- and 32-client parts start
    return {"first_call_ms": round(float(ms[0]), 1), "median_ms": round(float(np.median(ms)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1),
            "over_100ms": int((ms > 100).sum()), "calls": int(len(ms)),
            # over 100 ms at 1, 4 and 32 concurrent clients
            "over_100ms_by_clients": [int((part > 100).sum()) for part in np.split(ms, levels[1:])]}


async def _load_until_warm(address: str, log: Path | None, t0: float, clients: int, timeout: float):
    import grpc

    from metarec.api.v1 import recommender_pb2_grpc as pb_grpc

    requests = request_mix(400, seed=7)
    calls = []  # (seconds since process start at the call's end, latency in seconds)
    done = asyncio.Event()

    async def client(offset):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            i = offset
            while not done.is_set():
                method, request = requests[i % len(requests)]
                t = time.perf_counter()
                await getattr(stub, method)(request, timeout=120)
                calls.append((time.perf_counter() - t0, time.perf_counter() - t))
                i += clients

    async def watch():  # until the warm-up ends (no log: for ``timeout`` seconds)
        deadline = time.perf_counter() + timeout
        while (log is None or "warmed up in" not in log.read_text()) and time.perf_counter() < deadline:
            await asyncio.sleep(0.25)
        done.set()

    await asyncio.gather(watch(), *(client(c) for c in range(clients)))
    return calls


def load_until_warm(address: str, log: Path | None, t0: float, clients: int = 32, timeout: float = 900) -> dict:
    """``clients`` clients calling without pause until the server logs the warm-up's end
    (``log=None``: for ``timeout`` seconds)."""
    calls = asyncio.run(_load_until_warm(address, log, t0, clients, timeout))
    if not calls:  # already warm (``--serve-after-warm-up``)
        return {"clients": clients, "calls": 0}
    at = np.asarray([c[0] for c in calls])
    ms = np.asarray([c[1] for c in calls]) * 1e3
    windows = []
    for start in np.arange(5 * np.floor(at.min() / 5), at.max(), 5.0):
        inside = (at >= start) & (at < start + 5)
        windows.append([float(start), int(inside.sum()), int((ms[inside] > 100).sum())])
    return {"clients": clients, "from_s": round(float(at.min()), 1), "to_s": round(float(at.max()), 1),
            "calls": int(len(ms)), "over_100ms": int((ms > 100).sum()),
            "median_ms": round(float(np.median(ms)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1),
            "windows": windows}  # [start s, calls, calls over 100 ms] per 5 s


def wait_warmed(log: Path, t0: float, timeout: float = 900) -> float | None:
    """Seconds from process start until the server logs that its background warm-up ended
    (None if it never says so within ``timeout``)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if "warmed up in" in log.read_text():
            return time.perf_counter() - t0
        time.sleep(0.5)
    return None


def bench_backend(backend: str, model_path: Path, workdir: Path, args) -> list[dict]:
    model_dir = workdir / f"models-{backend}"
    (model_dir / "1").mkdir(parents=True)
    shutil.copy(model_path, model_dir / "1" / "model.keras")
    cache = None if args.no_cache else workdir / f"compile-cache-{backend}"
    runs = []
    for i in range(args.starts):
        proc, address, listening, t0, log = start(model_dir, workdir, backend, cache, str(i),
                                                  args.serve_after_warm_up)
        try:
            grpc_bench.wait_serving(address, timeout=600)
            serving = time.perf_counter() - t0
            run = {"start": i + 1, "listening_s": round(listening, 2), "serving_s": round(serving, 2)}
            loaded = [line.strip() for line in log.read_text().splitlines() if "loaded and checked" in line]
            run["load_log"] = re.sub(r"^.*?model ", "model ", loaded[0]) if loaded else None
            run.update(after_serving(address, args.requests))
            if args.load_while_warming:
                run["while_warming"] = load_until_warm(address, log, t0)
            # The same mix again once every shape is compiled: what the machine gives at
            # steady state, so that calls slow from load are told from calls slow from start-up.
            warmed = wait_warmed(log, t0)
            run["warmed_s"] = None if warmed is None else round(warmed, 1)
            run["steady"] = after_serving(address, args.requests)
            if args.load_while_warming:
                run["steady_load"] = load_until_warm(address, None, t0, timeout=20)
        except Exception:
            print(f"{backend}: start {i + 1} failed; the server's log ends with:\n"
                  + "\n".join(log.read_text().splitlines()[-20:]), file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(backend, json.dumps(run), flush=True)
        runs.append(run)
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="tensorflow,jax")
    p.add_argument("--starts", type=int, default=2, help="starts in a row sharing one compile cache")
    p.add_argument("--requests", type=int, default=300, help="calls measured after SERVING")
    p.add_argument("--no-cache", action="store_true", help="start without --compile-cache")
    p.add_argument("--serve-after-warm-up", action="store_true",
                   help="start the server with --serve-after-warm-up (SERVING once every shape is compiled)")
    p.add_argument("--load-while-warming", action="store_true",
                   help="after the mix, 32 clients call without pause until the warm-up ends")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    results = {"machine": machine.describe(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "command": " ".join(["python", "bench/startup.py", *(argv or sys.argv[1:])])}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path = workdir / "model.keras"
        env = dict(os.environ, KERAS_BACKEND=args.backends.split(",")[0])
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'bench'); import grpc_bench; "
                        f"from pathlib import Path; grpc_bench.train_model(Path({str(model_path)!r}))"],
                       cwd=ROOT, env=env, check=True)
        for backend in args.backends.split(","):
            results[backend] = bench_backend(backend, model_path, workdir, args)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
