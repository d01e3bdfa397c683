"""Variants of ``presets.catalogue_two_tower`` next to the ranking baselines, on protocol Q1's
split of any MovieLens folder (Q1: ml-100k; Q2: ml-latest-small), validation users scored too.

    python bench/catalogue_variants.py ../shared/data/ml-100k --k 5,10,20 --out runs/q1_variants \\
        --variant 'ctt-ones={"inner_rating_weights": null}' --variant ctt-ramp
    python bench/catalogue_variants.py ../shared/data/ml-latest-small --k 10 --epochs 3 \\
        --out runs/q2_variants --variant 'ctt-ones={"inner_rating_weights": null}' --variant ctt-ramp

Each ``--variant NAME=JSON`` is a method fitted as ``metarec evaluate`` fits
``catalogue-two-tower`` (early stopping on the validation users' Recall@20), with the JSON
object's keys passed to the preset (``NAME`` alone: the preset's defaults). Choose between
variants on the ``val`` rows only; the ``test`` rows are for reporting the chosen one.

Writes the usual report (``report.md``, ``report.json``, plots) to ``--out``, and
``summary.json`` there: mean Recall@20 / nDCG@20 / MAE per split, method and K (over users,
then seeds), and on the test users the paired Wilcoxon p of every variant against every
baseline and against the first variant (per-user figures averaged over seeds first).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

import machine  # noqa: E402 - bench/machine.py

METRICS = ("recall@20", "ndcg@20", "mae")


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME={json object}`` -> (name, preset keyword arguments); JSON lists
    become tuples (``inner_rating_weights`` knots are pairs)."""
    name, _, raw = text.partition("=")
    if not name:
        raise SystemExit(f"--variant needs a name, as NAME or NAME={{json}}; got {text!r}")
    try:
        kwargs = json.loads(raw) if raw else {}
    except ValueError as error:
        raise SystemExit(f"--variant {name}: the part after '=' must be a JSON object, got {raw!r} ({error})")
    if not isinstance(kwargs, dict):
        raise SystemExit(f"--variant {name}: the part after '=' must be a JSON object, got {raw!r}")

    def tuples(value):
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    return name, {key: tuples(value) for key, value in kwargs.items()}


def summarise(frame, split: str) -> list[dict]:
    columns = [m for m in METRICS if m in frame.columns]
    means = frame.groupby(["method", "k", "seed"])[columns].mean().groupby(["method", "k"]).mean()
    return [{"split": split, "method": method, "k": int(k),
             **{c: (None if value != value else round(float(value), 4)) for c, value in row.items()}}
            for (method, k), row in means.iterrows()]


def paired_tests(frame, variants: list[str], baselines: list[str]) -> list[dict]:
    from metarec.evaluation.stats import wilcoxon_paired

    out = []
    for k, at_k in frame.groupby("k"):
        for metric in ("recall@20", "ndcg@20"):
            per_user = at_k.groupby(["method", "user_id"])[metric].mean().unstack(0)
            for variant in variants:
                for other in baselines + [v for v in variants[:1] if v != variant]:
                    result = wilcoxon_paired(per_user[variant].to_numpy(), per_user[other].to_numpy())
                    out.append({"k": int(k), "metric": metric, "method": variant, "against": other,
                                "mean": round(float(per_user[variant].mean()), 4),
                                "against_mean": round(float(per_user[other].mean()), 4),
                                "p": float(result.p_value)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a MovieLens folder (ml-100k for Q1, ml-latest-small for Q2)")
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME or NAME={json preset arguments}; repeat for each variant")
    parser.add_argument("--baselines", default="most-popular,ease,item-knn",
                        help="ranking baselines to fit beside them (metarec evaluate's names)")
    parser.add_argument("--k", default="10", help="support sizes K, comma-separated (default 10)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=10, help="meta-training epochs at most (default 10)")
    parser.add_argument("--out", required=True, help="folder for the report and summary.json")
    args = parser.parse_args(argv)

    from metarec.evaluation.cli import load_data
    from metarec.evaluation.neural import catalogue_method
    from metarec.evaluation.protocol import Q1Protocol
    from metarec.evaluation.registry import build_methods
    from metarec.evaluation.report import run_evaluation

    ks = tuple(int(k) for k in args.k.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    variants = [parse_variant(text) for text in args.variant]
    data = load_data(args.data)
    baselines = build_methods(args.baselines, data, epochs=args.epochs)
    methods = baselines + [catalogue_method(name, epochs=args.epochs, **kwargs) for name, kwargs in variants]
    started = time.perf_counter()
    report = run_evaluation(Q1Protocol(data, k_values=ks), methods, seeds=seeds, k_values=ks)
    out = Path(args.out)
    report.save(out)
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": machine.describe(),
        "command": "python bench/catalogue_variants.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.perf_counter() - started),
        "variants": dict(variants),  # JSON writes the knot tuples as lists
        "rows": summarise(report.val_per_user, "val") + summarise(report.per_user, "test"),
        "paired_test": paired_tests(report.per_user, [name for name, _ in variants],
                                    [method.name for method in baselines]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for row in summary["rows"]:
        print(row)
    print(f"{summary['seconds']} s; wrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
