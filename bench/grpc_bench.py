"""Protocol S1 "gRPC" (../shared/BENCHMARK.md): Recommend over loopback.

Each request: a new user with 20 interactions, the model's inner steps (5), 1,000 candidate
items, top 10. Measured with 1 client (median / p99 latency over >= 200 calls after warm-up)
and with 32 concurrent clients (requests/s, latency, errors), per Keras backend, side by side
with the same model's plain non-adaptive ``predict_items`` on the same 1,000 items and the
in-process SDK ``adapt_many`` + ``recommend_many`` for one user (what gRPC adds on top).

The server runs in its own process (``python -m metarec_server.main``) so that client and server do
not share a GIL; the adapted-user cache is disabled so that every call adapts. Usage:

    python bench/grpc_bench.py                     # trains a small model, both backends
    python bench/grpc_bench.py --backends tensorflow --model path/to/model.keras
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
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

import machine  # noqa: E402 - bench/machine.py, after the path is set

SUPPORT_SIZE = 20
NUM_CANDIDATES = 1000
TOP_K = 10
INNER_STEPS = 5


def train_model(path: Path, seed: int = 0) -> None:
    """A MAML model over a 2,000-item synthetic catalogue with 5 inner steps."""
    import keras

    import metarec

    data = metarec.datasets.synthetic(num_users=600, num_items=2000, seed=seed)
    tasks = metarec.UserTasks(data, support_size=SUPPORT_SIZE)
    model = metarec.models.rating_mlp(tasks.encoder)
    learner = metarec.MAML(model, inner_steps=INNER_STEPS, inner_lr=0.05, adapt="decision_layers")
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.fit(tasks.train, epochs=1, batch_size=32, verbose=0)
    learner.save(path)


def make_users(num_items: int, n: int, seed: int = 1):
    """``n`` random users: (support item ids, ratings, candidate ids), all known items."""
    rng = np.random.default_rng(seed)
    users = []
    for _ in range(n):
        picks = rng.choice(np.arange(1, num_items + 1), size=SUPPORT_SIZE + NUM_CANDIDATES, replace=False)
        ratings = rng.integers(1, 6, size=SUPPORT_SIZE).astype(float)
        users.append((picks[:SUPPORT_SIZE], ratings, picks[SUPPORT_SIZE:]))
    return users


def summarize(latencies_s, wall_s=None, errors=0) -> dict:
    lat = np.asarray(latencies_s) * 1000
    out = {
        "calls": int(len(lat)),
        "median_ms": round(float(np.median(lat)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "errors": int(errors),
    }
    if wall_s:
        out["requests_per_s"] = round(len(lat) / wall_s, 1)
    return out


# ---------------------------------------------------------------------------- in-process reference
def reference(model_path: str, calls: int) -> dict:
    """Runs in a subprocess with KERAS_BACKEND set: plain predict and SDK adapt+recommend."""
    import pandas as pd

    import metarec

    learner = metarec.load(model_path)
    users = make_users(learner.encoder.num_items - 1, calls + 20)
    plain, sdk = [], []
    for i, (items, ratings, candidates) in enumerate(users):
        t = time.perf_counter()
        learner.predict_items(candidates)
        if i >= 20:
            plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        adapted = learner.adapt_many([pd.DataFrame({"item_id": items, "rating": ratings})])
        learner.recommend_many(adapted, TOP_K, True, [candidates])
        if i >= 20:
            sdk.append(time.perf_counter() - t)
    return {"plain_predict": summarize(plain), "sdk_adapt_recommend": summarize(sdk)}


# ---------------------------------------------------------------------------- gRPC clients
def requests_for(users):
    from metarec.api.v1 import recommender_pb2 as pb

    return [
        pb.RecommendRequest(
            user=pb.UserContext(
                interactions=[pb.Interaction(item_id=str(i), rating=r) for i, r in zip(items, ratings)]
            ),
            candidate_item_ids=[str(c) for c in candidates],
            k=TOP_K,
        )
        for items, ratings, candidates in users
    ]


def one_client(address: str, requests, warmup: int) -> dict:
    import grpc

    from metarec.api.v1 import recommender_pb2_grpc as pb_grpc

    latencies, errors = [], 0
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        for i, request in enumerate(requests):
            t = time.perf_counter()
            try:
                reply = stub.Recommend(request, timeout=30)
                assert len(reply.item_ids) == TOP_K
            except grpc.RpcError:
                errors += 1
            if i >= warmup:
                latencies.append(time.perf_counter() - t)
    return summarize(latencies, errors=errors)


async def concurrent_clients(address: str, requests, clients: int, warmup: int, channels: int = 1) -> dict:
    """``clients`` closed-loop callers over ``channels`` channels (each its own connection:
    a server with several workers spreads connections, not calls, across them)."""
    import grpc

    from metarec.api.v1 import recommender_pb2_grpc as pb_grpc

    latencies, errors = [], 0
    # A local subchannel pool: otherwise channels to one address share one connection.
    opened = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
              for _ in range(channels)]
    stubs = [pb_grpc.RecommenderServiceStub(channel) for channel in opened]
    try:
        async def worker(stub, chunk, record):
            nonlocal errors
            for request in chunk:
                t = time.perf_counter()
                try:
                    reply = await stub.Recommend(request, timeout=30)
                    assert len(reply.item_ids) == TOP_K
                except grpc.RpcError:
                    errors += record
                if record:
                    latencies.append(time.perf_counter() - t)

        warm = [requests[i::clients][: max(1, warmup // clients)] for i in range(clients)]
        await asyncio.gather(*(worker(stubs[i % channels], c, False) for i, c in enumerate(warm)))
        chunks = [requests[i::clients] for i in range(clients)]
        start = time.perf_counter()
        await asyncio.gather(*(worker(stubs[i % channels], c, True) for i, c in enumerate(chunks)))
        wall = time.perf_counter() - start
    finally:
        for channel in opened:
            await channel.close()
    return summarize(latencies, wall_s=wall, errors=errors)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process and its running children have used so far, from
    /proc (Linux): a server with --workers is a supervisor and its worker processes."""
    total = 0.0
    for p in [pid, *child_pids(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def child_pids(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out + [g for c in out for g in child_pids(c)]


def with_cpu_share(run, server_pid: int, n_requests: int) -> dict:
    """``run()``'s result plus the CPU the server process and this (client) process spent
    per request: where the machine's cores went, not only how long a request took."""
    server0, client0 = cpu_seconds(server_pid), time.process_time()
    wall0 = time.perf_counter()
    result = run()
    wall = time.perf_counter() - wall0
    server, client = cpu_seconds(server_pid) - server0, time.process_time() - client0
    result.update(server_cpu_ms_per_request=1e3 * server / n_requests,
                  client_cpu_ms_per_request=1e3 * client / n_requests,
                  cores_busy=(server + client) / wall)
    return result


def start_server(model_dir: Path, workdir: Path, backend: str, args) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, KERAS_BACKEND=backend)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "metarec_server.main",
            "--model-dir", str(model_dir), "--port", "0",
            "--log-db", str(workdir / f"log-{backend}.sqlite"), "--cache-size", "0",
            "--max-batch-size", str(args.max_batch_size), "--max-batch-delay-ms", str(args.max_delay_ms),
            "--log-level", "INFO", "--workers", str(args.workers),
        ],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=server_log(workdir, backend).open("w"), text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("metarec server listening on"):
        proc.kill()
        raise RuntimeError(f"server did not start ({backend}): {line!r}")
    return proc, line.strip().rsplit(" ", 1)[1]


def server_log(workdir: Path, backend: str) -> Path:
    return workdir / f"server-{backend}.log"


def wait_warmed(log: Path, workers: int, timeout: float = 900) -> None:
    """Wait until each worker's log says its background warm-up ended: measuring before that
    would time calls that share the CPU with the compiler (see bench/startup.py for those)."""
    deadline = time.monotonic() + timeout
    while log.read_text().count("warmed up in") < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server's warm-up did not end within {timeout:.0f} s (log: {log})")
        time.sleep(0.5)


def wait_serving(address: str, timeout: float = 300, connections: int = 1) -> None:
    """Wait until ``connections`` fresh connections in a row report SERVING (with several
    workers a connection reaches one of them, picked by the kernel: 16 per worker make
    missing a worker still warming up vanishingly unlikely)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    in_a_row = 0
    while time.monotonic() < deadline:
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                in_a_row = in_a_row + 1 if reply.status == health_pb2.HealthCheckResponse.SERVING else 0
            except grpc.RpcError:
                in_a_row = 0
        if in_a_row >= connections:
            return
        if in_a_row == 0:
            time.sleep(0.2)
    raise TimeoutError("the server did not load the model in time")


def bench_backend(backend: str, model_path: Path, workdir: Path, args) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend)
    ref = subprocess.run(
        [sys.executable, __file__, "--_reference", str(model_path), "--calls", str(args.calls)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    if ref.returncode != 0:
        raise RuntimeError(f"reference run failed on {backend}:\n{ref.stderr[-2000:]}")
    result = json.loads(ref.stdout.strip().splitlines()[-1])
    model_dir = workdir / f"models-{backend}"
    (model_dir / "1").mkdir(parents=True)
    shutil.copy(model_path, model_dir / "1" / "model.keras")
    proc, address = start_server(model_dir, workdir, backend, args)
    try:
        wait_serving(address, connections=1 if args.workers == 1 else 16 * args.workers)
        wait_warmed(server_log(workdir, backend), args.workers)
        import metarec.client  # noqa: F401 - only to fail early if the client is broken

        num_items = 2000
        warmup = 50
        users = make_users(num_items, args.calls + warmup, seed=2)
        requests = requests_for(users)
        result["grpc_1_client"] = with_cpu_share(
            lambda: one_client(address, requests, warmup), proc.pid, len(requests))
        channels = args.channels or args.clients
        users = make_users(num_items, args.concurrent_calls + 2 * warmup, seed=3)
        requests = requests_for(users)
        result[f"grpc_{args.clients}_clients"] = with_cpu_share(
            lambda: asyncio.run(concurrent_clients(address, requests, args.clients, 2 * warmup, channels)),
            proc.pid, len(requests))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="tensorflow,jax")
    p.add_argument("--model", type=Path, help="a saved meta-learner (default: train one)")
    p.add_argument("--calls", type=int, default=300, help="measured calls with 1 client")
    p.add_argument("--concurrent-calls", type=int, default=3000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--channels", type=int, default=0,
                   help="connections the concurrent clients use (default: one per client)")
    p.add_argument("--workers", type=int, default=1, help="server processes (metarec serve --workers)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=0.0)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--_reference", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._reference:
        print(json.dumps(reference(args._reference, args.calls)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path = args.model
        if model_path is None:
            model_path = workdir / "model.keras"
            subprocess.run(
                [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                 f"from bench.grpc_bench import train_model; from pathlib import Path; train_model(Path({str(model_path)!r}))"],
                cwd=ROOT, check=True, timeout=900,
            )
        results = {}
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            try:
                results[backend] = bench_backend(backend, model_path, workdir, args)
            except Exception as error:  # noqa: BLE001 - report the other backend anyway
                results[backend] = {"error": str(error)}
    report = {
        "protocol": "S1 gRPC",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine.describe(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "support": SUPPORT_SIZE, "inner_steps": INNER_STEPS, "candidates": NUM_CANDIDATES, "k": TOP_K,
            "workers": args.workers, "channels": args.channels or args.clients,
            "max_batch_size": args.max_batch_size, "max_delay_ms": args.max_delay_ms, "cache": "off",
        },
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
