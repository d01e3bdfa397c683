"""How fast the host builds meta-training episodes (``TaskSet.episodes``, what ``fit`` reads).

On a GPU the meta-train step is fast enough (S2: hundreds of thousands of user-tasks/s) that
building the padded numpy episodes on the host can be the slower half of a training run; this
times that half alone, exactly as ``fit`` asks for it (shuffled, a fresh support / query draw
per user and epoch, query cut to ``max_query`` rows), on MovieLens-1M when its folder is given
and on the synthetic data otherwise. No Keras backend is involved beyond the import.

    python bench/episodes.py --ml1m ../shared/data/ml-1m
    python bench/episodes.py                                  # synthetic users
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import machine  # noqa: E402 - bench/machine.py, after the path is set


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ml1m", type=Path, help="a MovieLens-1M folder (default: synthetic users)")
    p.add_argument("--batch-sizes", default="32,256,1024")
    p.add_argument("--support-size", type=int, default=10)
    p.add_argument("--max-query", type=int, default=128, help="as fit's default")
    p.add_argument("--epochs", type=int, default=3, help="timed passes over the users per batch size")
    args = p.parse_args()

    import metarec

    if args.ml1m:
        data, name = metarec.datasets.load_movielens(args.ml1m), "MovieLens-1M"
    else:
        data, name = metarec.datasets.synthetic(num_users=5000, seed=0), "synthetic(num_users=5000)"
    tasks = metarec.UserTasks(data, support_size=args.support_size, split="random",
                              user_split="random", fractions=(1.0, 0.0, 0.0))
    users = tasks.train
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        next(users.episodes(batch_size, shuffle=True, seed=0, max_query=args.max_query, resample=True))
        start = time.perf_counter()
        for epoch in range(args.epochs):
            for _ in users.episodes(batch_size, shuffle=True, seed=epoch, max_query=args.max_query,
                                    resample=True):
                pass
        seconds = time.perf_counter() - start
        results.append({"batch_size": batch_size, "users_per_s": args.epochs * len(users) / seconds,
                        "ms_per_episode": 1e3 * seconds / (args.epochs * users.num_batches(batch_size))})
    report = {"data": name, "users": len(users), "support_size": args.support_size,
              "max_query": args.max_query, "machine": machine.describe(),
              "command": "python bench/episodes.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
