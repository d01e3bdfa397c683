"""``metarec score-batch`` throughput (target: 2,000 users/s on 2 CPU cores).

    python bench/score_batch.py                  # both backends, 10,000 users
    python bench/score_batch.py --backends jax --users 4096

Each user has 20 interactions (the support) and features; every user ranks the same 1,000
candidate items (a candidate file, as ``--candidates items.parquet`` gives); top 20, 5 inner
steps, seen items excluded, chunks of 1,024 users, Parquet parts written to a temporary folder.
The model and catalogue are those of ``bench/s1_speed.py`` (``rating_mlp`` 32 per feature,
64-64-1, 2,000 items). Timed: the whole ``metarec.batch_scoring.score_batch`` call (grouping,
encoding, adaptation, scoring, top-k, Parquet), after one warm-up run on the first chunk.
Results: ``bench/results/score_batch.json`` and a line per backend on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def worker(args):
    import numpy as np
    import pandas as pd
    from s1_speed import _setup, _users

    from metarec import backend
    from metarec.batch_scoring import score_batch

    learner = _setup("decision_layers")
    users = _users(args.users, seed=3)
    interactions = pd.concat([frame.assign(user_id=f"u{i:06d}") for i, (frame, _, _) in enumerate(users)],
                             ignore_index=True)
    features = pd.DataFrame([f for _, f, _ in users], index=[f"u{i:06d}" for i in range(len(users))])
    candidates = np.asarray(users[0][2])
    with tempfile.TemporaryDirectory() as tmp:
        warm = interactions[interactions["user_id"] < f"u{args.chunk:06d}"]
        score_batch(learner, warm, Path(tmp) / "warm", candidates=candidates, k=20,
                    user_features=features, chunk_users=args.chunk, verbose=0)
        start = time.perf_counter()
        out = score_batch(learner, interactions, Path(tmp) / "run", candidates=candidates, k=20,
                          user_features=features, chunk_users=args.chunk, verbose=0)
        seconds = time.perf_counter() - start
        rows = len(pd.read_parquet(out))
    if rows != 20 * args.users:
        raise RuntimeError(f"expected {20 * args.users} rows, wrote {rows}")
    return {"backend": backend.BACKEND, "users": args.users, "chunk_users": args.chunk,
            "seconds": seconds, "users_per_s": args.users / seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="tensorflow,jax")
    p.add_argument("--users", type=int, default=10000)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "score_batch.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    from s1_speed import run_workers, save_report

    results = run_workers(__file__, sys.argv[1:], args.backends)
    for r in results:
        print(f"{r['backend']}: {r['users']} users in {r['seconds']:.1f} s = {r['users_per_s']:,.0f} users/s")
    save_report(__file__, results, args.out)


if __name__ == "__main__":
    main()
