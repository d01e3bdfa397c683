"""The three meta-learner families side by side, on protocol S1's shapes (../shared/BENCHMARK.md).

    python bench/families.py                     # both backends
    python bench/families.py --backends jax --quick

For each family, on the same model (``rating_mlp``, 32 per feature, 64-64-1, decision layers
adapted) and the same synthetic 2,000-item catalogue as ``bench/s1_speed.py``:

* ``train``: user-tasks/s of one meta-train step (meta-batch 32, support 20, query 20);
* ``adapt``: one user's adapt + score of 1,000 candidates + top 10 through the SDK path the
  server uses (median ms over the timed calls) and plain ``predict_items`` beside it;
* ``batch``: users/s adapting and scoring users in vectorised batches of 1,024.

Families: gradient-based (MAML second order, 5 steps; first-order MAML, 5 steps; Reptile, 5
steps), optimisation-based (Meta-SGD, 1 step with learned per-parameter rates) and
memory-based (``MemoryLearner``: a GRU reads the support set, no step; and with 1 step after).
Results go to ``bench/results/families.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

#: name -> (learner class, inner steps, extra arguments)
FAMILIES = {
    "MAML (2nd order), 5 steps": ("MAML", 5, {"first_order": False}),
    "first-order MAML, 5 steps": ("MAML", 5, {"first_order": True}),
    "Reptile, 5 steps": ("Reptile", 5, {}),
    "Meta-SGD, 1 step": ("MetaSGD", 1, {}),
    "memory (GRU), 0 steps": ("MemoryLearner", 0, {"units": 64}),
    "memory (GRU) + 1 step": ("MemoryLearner", 1, {"units": 64}),
}


def worker(args):
    from s1_speed import _setup, bench_adapt_score, bench_batch, bench_train

    from metarec import backend

    calls = 40 if args.quick else args.calls
    users = 1024 if args.quick else args.batch_total
    rows = []
    for name, (cls, steps, kwargs) in FAMILIES.items():
        learner = _setup("decision_layers", cls, inner_steps=steps, **kwargs)
        train = bench_train(name, steps, "decision_layers", 5 if args.quick else args.train_calls, 2,
                            learner=learner)
        adapt = bench_adapt_score("decision_layers", calls, 5 if args.quick else 20, learner=learner)
        batch = bench_batch("decision_layers", users, 1024, learner=learner)
        rows.append({
            "family": name,
            "train_user_tasks_per_s": train["user_tasks_per_s"],
            "adapt_score_median_ms": adapt["adapt_score"]["median_ms"],
            "adapt_score_p99_ms": adapt["adapt_score"]["p99_ms"],
            "plain_predict_median_ms": adapt["plain_predict"]["median_ms"],
            "batch_users_per_s": batch["users_per_s"],
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"backend": backend.BACKEND, "rows": rows}


def markdown(results):
    lines = []
    for res in results:
        lines += [f"**{res['backend']}**", "",
                  "| family | meta-train user-tasks/s | adapt+score median ms (p99) | plain predict ms | batch users/s |",
                  "|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(
                f"| {r['family']} | {r['train_user_tasks_per_s']:,.0f} | {r['adapt_score_median_ms']:.2f} "
                f"({r['adapt_score_p99_ms']:.2f}) | {r['plain_predict_median_ms']:.2f} | "
                f"{r['batch_users_per_s']:,.0f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="tensorflow,jax")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--batch-total", type=int, default=4096)
    p.add_argument("--train-calls", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "families.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    from s1_speed import run_workers, save_report

    results = run_workers(__file__, sys.argv[1:], args.backends)
    print(markdown(results))
    save_report(__file__, results, args.out)


if __name__ == "__main__":
    main()
