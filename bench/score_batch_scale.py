"""``score-batch`` at scale: a synthetic input of millions of users, memory, lookups, Ray.

    python bench/score_batch_scale.py generate --users 10000000 --out /tmp/metarec-10m
    python bench/score_batch_scale.py lookup --users 1000000,10000000
    python bench/score_batch_scale.py stream --input /tmp/metarec-10m
    python bench/score_batch_scale.py score --input /tmp/metarec-20k
    python bench/score_batch_scale.py ray --input /tmp/metarec-20k --actors 1,2

``generate`` writes a user-sorted folder of Parquet files (``interactions/``, 20 interactions
per user, string user ids, 100,000 users per file) and ``user_features.parquet`` (``segment``,
``age``); the catalogue is ``bench/s1_speed.py``'s (2,000 items). Nothing is committed: write it
under /tmp.

``lookup`` times one 1,024-user chunk's user-feature lookup in a table of N users: the former
``index.isin(chunk)`` scan of the whole table against :class:`UserFeatureLookup` (one
``get_indexer`` join on an index built once); median of 20 chunks.

``stream`` reads the whole input through :func:`metarec.user_chunks.iter_user_chunks`
(chunks of 1,024 whole users) and looks up every chunk's user features, as ``score-batch``
does, without the model: the time and peak memory of the job's data path. ``score`` runs the
real job (``bench/s1_speed.py``'s model, top 20 of the same 1,000 candidates, 5 inner steps)
on a path (streamed) and on the same input read into one DataFrame. ``ray`` runs the job on
Ray Data (a local instance with 2 CPUs) with 1 and 2 actors against the single-process job on
the same input; Ray's times include starting the actors and loading the model.

Every measurement runs in a fresh process; peak memory is that process's maximum resident
set size (``resource.getrusage``). Results: ``bench/results/score_batch_scale_<mode>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
USERS_PER_FILE = 100_000
CHUNK = 1024
K = 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def user_ids(start: int, stop: int) -> np.ndarray:
    return np.asarray([f"u{i:09d}" for i in range(start, stop)], dtype=object)


def generate(args):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from s1_speed import SUPPORT, _data

    data, _ = _data()
    items = np.asarray(data.items.index)
    segments = np.asarray(sorted(set(data.users["segment"])), dtype=object)
    out = Path(args.out)
    (out / "interactions").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    feature_writer = None
    start = time.perf_counter()
    for f, first in enumerate(range(0, args.users, USERS_PER_FILE)):
        last = min(first + USERS_PER_FILE, args.users)
        ids = user_ids(first, last)
        n = len(ids)
        table = pa.table({
            "user_id": pa.array(np.repeat(ids, SUPPORT), pa.string()),
            "item_id": pa.array(items[rng.integers(0, len(items), n * SUPPORT)]),
            "rating": rng.integers(1, 6, n * SUPPORT).astype(np.float64),
        })
        pq.write_table(table, out / "interactions" / f"part-{f:05d}.parquet")
        features = pa.Table.from_pandas(pd.DataFrame({
            "user_id": ids, "segment": segments[np.arange(first, last) % len(segments)],
            "age": rng.integers(18, 70, n)}), preserve_index=False)
        if feature_writer is None:
            feature_writer = pq.ParquetWriter(out / "user_features.parquet", features.schema)
        feature_writer.write_table(features)
    feature_writer.close()
    pd.DataFrame({"item_id": np.random.default_rng(1).choice(items, 1000, replace=False)}).to_parquet(
        out / "candidates.parquet")
    return {"users": args.users, "rows": args.users * SUPPORT, "seconds": time.perf_counter() - start,
            "bytes": sum(p.stat().st_size for p in out.rglob("*.parquet"))}


def lookup(args):
    import pandas as pd

    from metarec.batch_scoring import UserFeatureLookup

    results = []
    for n in [int(x) for x in args.users.split(",")]:
        rng = np.random.default_rng(0)
        frame = pd.DataFrame({"segment": rng.integers(0, 8, n), "age": rng.integers(18, 70, n)},
                             index=pd.Index(user_ids(0, n), name="user_id"))
        t0 = time.perf_counter()
        table = UserFeatureLookup(frame)
        build_s = time.perf_counter() - t0
        old, new = [], []
        for c in range(20):
            first = int(rng.integers(0, n - CHUNK))
            chunk = user_ids(first, first + CHUNK)
            t0 = time.perf_counter()
            known = frame.index.isin(chunk)
            rows = dict(zip(frame.index[known], frame[known].to_dict("records")))
            expected = [rows.get(u, {}) for u in chunk]
            old.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = table.rows(chunk)
            new.append(time.perf_counter() - t0)
            assert got == expected
        results.append({"users": n, "isin_ms_per_chunk": 1e3 * float(np.median(old)),
                        "join_ms_per_chunk": 1e3 * float(np.median(new)),
                        "index_build_s": build_s})
        print(f"{n:,} users: isin {results[-1]['isin_ms_per_chunk']:.2f} ms/chunk, join "
              f"{results[-1]['join_ms_per_chunk']:.3f} ms/chunk (index built once in {build_s:.2f} s)",
              flush=True)
    return results


def stream(args):
    import pandas as pd

    from metarec.batch_scoring import UserFeatureLookup, _users_of
    from metarec.user_chunks import iter_user_chunks

    start = time.perf_counter()
    features = UserFeatureLookup(pd.read_parquet(Path(args.input) / "user_features.parquet")
                                 .set_index("user_id"))
    features_s = time.perf_counter() - start
    rss_features = peak_rss_mb()
    users = rows = 0
    for chunk in iter_user_chunks(Path(args.input) / "interactions", CHUNK):
        ids, _ = _users_of(chunk)
        features.rows(ids)
        users += len(ids)
        rows += len(chunk)
    return {"users": users, "rows": rows, "seconds": time.perf_counter() - start,
            "features_load_s": features_s, "peak_rss_mb_after_features": rss_features,
            "peak_rss_mb": peak_rss_mb()}


def _job_inputs(args):
    import pandas as pd
    from s1_speed import _setup

    learner = _setup("decision_layers")
    folder = Path(args.input)
    features = pd.read_parquet(folder / "user_features.parquet").set_index("user_id")
    candidates = pd.read_parquet(folder / "candidates.parquet")["item_id"].to_numpy()
    return learner, folder / "interactions", features, candidates


def score(args):
    import pandas as pd

    from metarec.batch_scoring import score_batch

    learner, interactions, features, candidates = _job_inputs(args)
    kwargs = dict(candidates=candidates, k=K, user_features=features, chunk_users=CHUNK, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: the model's kernels compiled once, as bench/score_batch.py does.
        first = sorted(interactions.glob("*.parquet"))[0]
        warm = pd.read_parquet(first).iloc[: CHUNK * 20]
        score_batch(learner, warm, Path(tmp) / "warm", **kwargs)
        rss_before = peak_rss_mb()
        start = time.perf_counter()
        if args.in_memory:
            out = score_batch(learner, pd.read_parquet(interactions), Path(tmp) / "run", **kwargs)
        else:
            out = score_batch(learner, interactions, Path(tmp) / "run", **kwargs)
        seconds = time.perf_counter() - start
        users = pd.read_parquet(out, columns=["user_id"])["user_id"].nunique()
    return {"input": "one DataFrame" if args.in_memory else "streamed path", "users": int(users),
            "seconds": seconds, "users_per_s": users / seconds,
            "peak_rss_mb_before_job": rss_before, "peak_rss_mb": peak_rss_mb()}


def ray_job(args):
    import pandas as pd
    import ray

    from metarec.ray_scoring import score_batch_ray

    learner, interactions, features, candidates = _job_inputs(args)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.keras"
        learner.save(model)
        start = time.perf_counter()
        out = score_batch_ray(model, interactions, Path(tmp) / "run", candidates=candidates, k=K,
                              user_features=features, chunk_users=CHUNK, actors=args.actors,
                              num_cpus=2.0 / args.actors / 2, partitions=8 * args.actors)
        seconds = time.perf_counter() - start
        users = pd.read_parquet(out, columns=["user_id"])["user_id"].nunique()
    ray.shutdown()
    return {"engine": f"ray, {args.actors} actor(s)", "users": int(users), "seconds": seconds,
            "users_per_s": users / seconds}


MODES = {"generate": generate, "lookup": lookup, "stream": stream, "score": score, "ray": ray_job}


def run_fresh(mode, argv):
    """One measurement in a fresh process; its RESULT line."""
    cmd = [sys.executable, __file__, mode, "--worker"] + argv
    print("== " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if proc.returncode:
        raise SystemExit(f"{mode} worker failed ({proc.returncode})")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--users", default="10000000", help="generate: users; lookup: comma list")
    p.add_argument("--out", default="/tmp/metarec-10m", help="generate: the folder to write")
    p.add_argument("--input", default="/tmp/metarec-10m", help="a folder that generate wrote")
    p.add_argument("--actors", default="1,2", help="ray: comma list of actor counts")
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        if args.mode == "generate":
            args.users = int(args.users)
        if args.mode == "ray":
            args.actors = int(args.actors)
        print("RESULT " + json.dumps(MODES[args.mode](args)), flush=True)
        return
    from s1_speed import save_report

    base = ["--input", args.input]
    if args.mode == "score":
        results = [run_fresh("score", base), run_fresh("score", base + ["--in-memory"])]
    elif args.mode == "ray":
        results = [run_fresh("score", base)]
        results += [run_fresh("ray", base + [f"--actors={n}"]) for n in args.actors.split(",")]
        for r in results[1:]:
            r["ratio_to_single_process"] = r["users_per_s"] / results[0]["users_per_s"]
    else:
        results = [run_fresh(args.mode, sys.argv[2:])]
    for r in results:
        print(json.dumps(r))
    save_report(__file__, results, ROOT / "bench" / "results" / f"score_batch_scale_{args.mode}.json")


if __name__ == "__main__":
    main()
