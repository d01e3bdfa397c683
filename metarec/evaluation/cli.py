"""``metarec evaluate``: protocol Q1 from the command line (see ``metarec evaluate --help``)."""

from __future__ import annotations

import platform
import sys
import time

from metarec.evaluation.registry import GROUPS, METHOD_HELP, build_methods

__all__ = ["load_data", "parse_int_list", "run_evaluate_cli"]

INNER_STEPS = tuple(range(11))


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """``"0,1,2"`` → ``(0, 1, 2)``; ValueError quoting the text otherwise."""
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what} must hold at least one integer, got {text!r}")
    return values


def load_data(spec: str, feedback: str = "explicit"):
    """``"synthetic"`` (the default generator, seed 0) or a MovieLens folder; ``feedback=
    "implicit"`` turns every rating into an interaction labelled 1 (protocol Q2-implicit)."""
    from metarec.datasets import load_movielens, synthetic

    if spec == "synthetic":
        return synthetic(seed=0, feedback=feedback)
    return load_movielens(spec, feedback=feedback)


def run_evaluate_cli(args) -> int:
    """Run Q1 for ``args`` (from ``metarec.cli``), print the table and save the report."""
    if args.list_methods:
        for name, text in METHOD_HELP.items():
            print(f"{name:18s} {text}")
        for name, members in GROUPS.items():
            print(f"{name:18s} group: {', '.join(members)}")
        return 0
    seeds = parse_int_list(args.seeds, "--seeds")
    k_values = parse_int_list(args.k, "--k")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be a positive integer, got {args.epochs!r}")
    if getattr(args, "search", None):
        return _run_search(args, seeds[0], k_values[0])
    from metarec.evaluation.neural import adaptive_learner, inner_step_curve
    from metarec.evaluation.protocol import Q1Protocol
    from metarec.evaluation.report import HEADLINE_K, run_evaluation

    started = time.perf_counter()
    data = load_data(args.data, getattr(args, "feedback", "explicit"))
    methods = build_methods(args.methods, data, epochs=args.epochs)
    protocol = Q1Protocol(data, k_values=k_values)
    headline = HEADLINE_K if HEADLINE_K in k_values else k_values[len(k_values) // 2]
    # The headline K runs last, so each method object ends up fitted at the headline K
    # (last seed) and the inner-steps curve re-adapts that fit; the report sorts K anyway.
    order = tuple(k for k in k_values if k != headline) + (headline,)
    report = run_evaluation(protocol, methods, seeds=seeds, k_values=order)
    # Saved now and again below: the curves re-adapt every learner many times, and the
    # figures above must not be lost if that is interrupted.
    report.save(args.out)
    curves, recall_curves = {}, {}
    for m in methods:
        if adaptive_learner(m) is not None:
            if m.predicts_ratings and data.feedback == "explicit":
                curves[m.name] = inner_step_curve(m, protocol, headline, INNER_STEPS)
            recall_curves[m.name] = inner_step_curve(m, protocol, headline, INNER_STEPS, metric="recall@20")
            m.learner = None  # done with this fit: let its weights and programs go
    if curves:
        report.set_inner_step_curves(curves)
    if recall_curves:
        report.set_recall_step_curves(recall_curves)
    print(report.to_markdown())
    for label, found in (("MAE", curves), ("Recall@20", recall_curves)):
        if found:
            print(f"{label} against inner steps (K={headline}, test users, seed {seeds[-1]}):")
            for name, curve in found.items():
                print(f"- {name}: " + ", ".join(f"{s}: {v:.3f}" for s, v in curve.items()))
    argv = " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("metarec") else ""
    print(f"machine: {platform.node()} ({platform.machine()}), {time.perf_counter() - started:.0f} s"
          + (f"; command: metarec {argv}" if argv else ""))
    for name, path in report.save(args.out).items():
        print(f"wrote {name}: {path}")
    return 0


def _run_search(args, seed: int, k: int) -> int:
    """``metarec evaluate --search METHOD``: the validation-only grid search, as a table."""
    import os

    from metarec.evaluation.protocol import Q1Protocol
    from metarec.evaluation.search import GRIDS, search

    if args.search not in GRIDS:
        raise ValueError(f"--search: no search space for {args.search!r}; choose from {sorted(GRIDS)}")
    started = time.perf_counter()
    protocol = Q1Protocol(load_data(args.data), k_values=(k,))
    table = search(protocol, args.search, k=k, seed=seed, epochs=args.epochs or 30)
    text = (f"# Hyper-parameter search: {args.search}, K={k}, seed {seed}, validation users only\n\n"
            + _markdown_table(table) + "\n")
    print(text)
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "search.csv"), index=False)
    with open(os.path.join(args.out, "search.md"), "w") as f:
        f.write(text)
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.out}/search.md and search.csv")
    return 0


def _markdown_table(frame) -> str:
    """A DataFrame as a Markdown table (floats to 4 decimals), without extra dependencies."""
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
