"""Protocol Q1 (BENCHMARK.md) for the mean baselines on MovieLens-100K.

Usage (from the project root)::

    python bench/q1_baselines.py [PATH_TO_ML_100K] [--split test|val] [--out DIR]

Prints the markdown table (test users, K = 5, 10, 20; hyper-parameters chosen on the
validation users) and, with ``--out``, writes report.md, report.json and the PNG plots.
The baselines are deterministic, so one seed is run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

import machine  # noqa: E402 - bench/machine.py

from metarec.datasets import load_movielens  # noqa: E402
from metarec.evaluation import GlobalMean, ItemMean, ItemMeanUserOffset, Q1Protocol, run_evaluation  # noqa: E402

DEFAULT_PATH = ROOT.parent / "shared" / "data" / "ml-100k"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=str(DEFAULT_PATH),
                        help=f"MovieLens-100K folder (default: {DEFAULT_PATH})")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="users to report on (hyper-parameters always come from val)")
    parser.add_argument("--out", default=None, help="folder for report.md / report.json / PNGs")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    protocol = Q1Protocol(load_movielens(args.path))
    report = run_evaluation(protocol, [GlobalMean(), ItemMean(), ItemMeanUserOffset()],
                            seeds=(0,), split=args.split)
    print(report.to_markdown())
    print(f"command: python bench/q1_baselines.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {machine.describe()}, {time.perf_counter() - started:.1f} s")
    if args.out:
        for name, path in report.save(args.out).items():
            print(f"wrote {name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
