"""Run methods through a protocol and report the results (markdown, JSON, PNG plots).

:func:`run_evaluation` fits every method at every K (stochastic methods once per seed,
deterministic ones once) and collects the per-user figures of
:meth:`~metarec.evaluation.protocol.Q1Protocol.evaluate_method` into a :class:`Report`.

How figures are aggregated: per (method, K, seed), the mean over users (NaN users, e.g.
without a relevant item, excluded); then mean ± sample std over seeds. Paired tests use
per-user figures averaged over seeds, compared user by user with the strongest baseline of
that metric, which is chosen on the validation users' figures when the report has them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metarec.evaluation.methods import Method
from metarec.evaluation.protocol import DIAGNOSTIC_COLUMNS, METRIC_COLUMNS, Q1Protocol
from metarec.evaluation.stats import format_mean_std, mean_std, wilcoxon_paired
from metarec.progress import ProgressBar  # re-exported

__all__ = ["ProgressBar", "Report", "plot_mae_vs_inner_steps", "run_evaluation"]

HEADLINE_K = 10
METRIC_LABELS = {
    "mae": "MAE", "rmse": "RMSE", "ndcg@3": "nDCG@3", "ndcg@10": "nDCG@10",
    "recall@20": "Recall@20 (cat.)", "ndcg@20": "nDCG@20 (cat.)",
}
#: Metrics where lower is better (the rest are higher-is-better).
LOWER_IS_BETTER = frozenset({"mae", "rmse"})
BAR_METRICS = ("mae", "ndcg@3", "recall@20")
#: Metrics with a paired test against their own strongest baseline (JSON: all of them;
#: markdown: MAE and catalogue Recall@20 at the headline K).
TESTED_METRICS = ("mae", "ndcg@3", "recall@20", "ndcg@20")
MARKDOWN_TESTED_METRICS = ("mae", "recall@20")


# --------------------------------------------------------------------------- progress
# --------------------------------------------------------------------------- evaluation
def _seeds_for(method: Method, seeds: Sequence[int]) -> tuple[int, ...]:
    # A deterministic method gives identical figures for every seed: run it once.
    return tuple(seeds[:1]) if method.deterministic else tuple(seeds)


def run_evaluation(
    protocol: Q1Protocol,
    methods: Sequence[Method],
    seeds: Sequence[int] = (0, 1, 2),
    k_values: Sequence[int] | None = None,
    split: str = "test",
    progress: bool = True,
    score_validation: bool = True,
) -> Report:
    """Fit and score every method at every K; returns a :class:`Report`.

    Each method is fitted on the meta-train users of that K with the validation users for
    hyper-parameter choices (``method.fit(tasks.train, tasks.val, seed)``), then scored on
    ``split`` (``"test"`` by default; ``"val"`` while developing). Methods are fitted
    afresh for every (K, seed), so a method object may be reused across calls. With
    ``score_validation`` (and ``split="test"``) each fit is also scored on the validation
    users, so that the strongest baseline of each metric is chosen on them, not on test.
    """
    methods = list(methods)
    if not methods:
        raise ValueError("methods is empty: pass at least one Method")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    for method in methods:
        if not isinstance(method, Method):
            raise ValueError(f"every method must be a metarec.evaluation.Method, got {method!r}")
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError(f"seeds must hold at least one seed, got {seeds!r}")
    k_values = protocol.k_values if k_values is None else tuple(k_values)
    for k in k_values:
        protocol.tasks(k)  # raises ValueError for a K the protocol does not have

    total = sum(len(_seeds_for(m, seeds)) for m in methods) * len(k_values)
    bar = ProgressBar(total) if progress else None
    frames, val_frames, fitted = [], [], []
    score_validation = score_validation and split != "val"
    for k in k_values:
        tasks = protocol.tasks(k)
        for method in methods:
            for seed in _seeds_for(method, seeds):
                started = time.perf_counter()
                if bar is not None:
                    bar.begin(f"fitting {method.name} K={k} seed={seed}")
                method.fit(tasks.train, tasks.val, seed=seed)
                frame = protocol.evaluate_method(method, split=split, k=k)
                frame.insert(0, "method", method.name)
                frame.insert(1, "k", k)
                frame.insert(2, "seed", seed)
                frames.append(frame)
                if score_validation:
                    val_frame = protocol.evaluate_method(method, split="val", k=k)
                    val_frame.insert(0, "method", method.name)
                    val_frame.insert(1, "k", k)
                    val_frame.insert(2, "seed", seed)
                    val_frames.append(val_frame)
                fitted.append({"method": method.name, "k": k, "seed": seed,
                               "params": _jsonable(method.get_params()),
                               "seconds": round(time.perf_counter() - started, 3)})
                if bar is not None:
                    bar.update(f"{method.name} K={k} seed={seed}")
    return Report(
        per_user=pd.concat(frames, ignore_index=True),
        methods=names,
        baselines=[m.name for m in methods if m.is_baseline],
        protocol_info={**protocol.describe(), "split": split},
        runs=fitted,
        val_per_user=pd.concat(val_frames, ignore_index=True) if val_frames else None,
    )


# --------------------------------------------------------------------------- report
class Report:
    """Per-user results of several methods at several K and seeds.

    Args:
        per_user: one row per (method, k, seed, user) with :data:`METRIC_COLUMNS`.
        methods: method names in display order.
        baselines: names of the reference methods (the strongest is tested against).
        protocol_info: JSON-able description of the split.
        runs: one record per fit (method, k, seed, chosen hyper-parameters, seconds).
        headline_k: the K of the headline table and of the paired tests.
        val_per_user: the same figures on the validation users (optional); when present,
            the strongest baseline of each metric is chosen on them.
    """

    def __init__(
        self,
        per_user: pd.DataFrame,
        methods: Sequence[str],
        baselines: Sequence[str] = (),
        protocol_info: Mapping[str, Any] | None = None,
        runs: Sequence[Mapping[str, Any]] = (),
        headline_k: int = HEADLINE_K,
        val_per_user: pd.DataFrame | None = None,
    ) -> None:
        missing = [c for c in ("method", "k", "seed", "user_id", *METRIC_COLUMNS) if c not in per_user]
        if missing:
            raise ValueError(f"per_user lacks columns {missing}; got {list(per_user.columns)}")
        self.per_user = per_user
        self.methods = list(methods)
        self.baselines = [b for b in baselines if b in self.methods]
        self.protocol_info = dict(protocol_info or {})
        self.runs = [dict(r) for r in runs]
        self.k_values = sorted(int(k) for k in per_user["k"].unique())
        self.headline_k = headline_k if headline_k in self.k_values else self.k_values[len(self.k_values) // 2]
        self.inner_step_curves: dict[str, dict[int, float]] = {}
        self.recall_step_curves: dict[str, dict[int, float]] = {}
        self.val_per_user = val_per_user if val_per_user is not None and len(val_per_user) else None

    # ------------------------------------------------------------------ aggregation
    def seed_means(self, split: str = "test") -> pd.DataFrame:
        """Mean over users per (method, k, seed); NaN users are excluded. ``split="val"``
        uses the validation users' figures (``val_per_user``)."""
        frame = self.val_per_user if split == "val" else self.per_user
        return frame.groupby(["method", "k", "seed"], sort=False)[list(METRIC_COLUMNS)].mean()

    def summary(self, split: str = "test") -> pd.DataFrame:
        """One row per (method, k): ``<metric>_mean``, ``<metric>_std`` over seeds, ``seeds``."""
        per_seed = self.seed_means(split).reset_index()
        rows = []
        for (method, k), group in per_seed.groupby(["method", "k"], sort=False):
            row = {"method": method, "k": int(k), "seeds": len(group)}
            for metric in METRIC_COLUMNS:
                row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(group[metric])
            rows.append(row)
        out = pd.DataFrame(rows)
        order = {name: i for i, name in enumerate(self.methods)}
        return out.sort_values(["k", "method"], key=lambda c: c.map(order) if c.name == "method" else c,
                               kind="stable").reset_index(drop=True)

    def user_means(self, method: str, k: int, metric: str = "mae") -> pd.Series:
        """Per-user figure of ``method`` at ``k``, averaged over seeds, indexed by user id."""
        rows = self.per_user[(self.per_user["method"] == method) & (self.per_user["k"] == k)]
        if rows.empty:
            raise ValueError(f"no results for method {method!r} at K={k}")
        return rows.groupby("user_id", sort=True)[metric].mean()

    @property
    def baseline_choice_split(self) -> str:
        """``"val"`` when the strongest baselines are chosen on validation users' figures,
        ``"test"`` when the report has none (then the choice is made on test users)."""
        if self.val_per_user is not None and self.val_per_user["method"].isin(self.baselines).any():
            return "val"
        return "test"

    def strongest_baseline(self, k: int | None = None, metric: str = "mae") -> str | None:
        """The best baseline on ``metric`` at ``k`` (default: the headline K), per metric:
        lowest mean for MAE / RMSE, highest otherwise, among the baselines that report the
        metric (ranking baselines have no MAE). Chosen on the validation users' figures
        when the report has them (:attr:`baseline_choice_split`), otherwise on test."""
        if metric not in METRIC_COLUMNS:
            raise ValueError(f"metric must be one of {METRIC_COLUMNS}, got {metric!r}")
        if not self.baselines:
            return None
        k = self.headline_k if k is None else k
        summary = self.summary(self.baseline_choice_split)
        at_k = summary[(summary["k"] == k) & summary["method"].isin(self.baselines)]
        at_k = at_k[np.isfinite(at_k[f"{metric}_mean"].to_numpy(dtype=np.float64))]
        if at_k.empty:
            return None
        ordered = at_k.sort_values(f"{metric}_mean", ascending=metric in LOWER_IS_BETTER, kind="stable")
        return str(ordered.iloc[0]["method"])

    def strongest_baselines(self, k: int | None = None) -> dict[str, str | None]:
        """:meth:`strongest_baseline` of every tested metric at ``k``."""
        return {metric: self.strongest_baseline(k, metric) for metric in TESTED_METRICS}

    def paired_tests(self, k: int | None = None, metric: str = "mae") -> dict[str, dict[str, float]]:
        """Wilcoxon signed-rank test of every method vs the strongest baseline of ``metric``
        at ``k`` (test users).

        Users are matched by id; ``median_difference`` is method minus baseline. Methods
        without the metric (MAE of a ranking baseline) are left out.
        """
        k = self.headline_k if k is None else k
        reference = self.strongest_baseline(k, metric)
        if reference is None:
            return {}
        base = self.user_means(reference, k, metric)
        tests = {}
        for method in self.methods:
            if method == reference or not ((self.per_user["method"] == method) & (self.per_user["k"] == k)).any():
                continue
            mine = self.user_means(method, k, metric).reindex(base.index)
            if not np.isfinite(mine.to_numpy(dtype=np.float64)).any():
                continue
            result = wilcoxon_paired(mine.to_numpy(), base.to_numpy())
            tests[method] = {"reference": reference, **result._asdict()}
        return tests

    def personalization(self, k: int | None = None) -> pd.DataFrame:
        """The personalization diagnostic of every adaptive method at ``k`` (test users):
        mean catalogue Recall@20 after and before adaptation, the gain with its paired
        Wilcoxon test over users (per-user figures averaged over seeds), and the mean share
        of the top 20 left in place by adaptation (1 = adaptation changes nothing)."""
        k = self.headline_k if k is None else k
        rows = []
        frame = self.per_user[self.per_user["k"] == k]
        if "overlap@20" not in frame:
            return pd.DataFrame(columns=["method", "recall@20", "recall@20_unadapted", "gain",
                                         "p_value", "overlap@20"])
        for method in self.methods:
            mine = frame[frame["method"] == method]
            if mine.empty or not np.isfinite(mine["overlap@20"].to_numpy(dtype=np.float64)).any():
                continue
            per_user = mine.groupby("user_id", sort=True)[["recall@20", *DIAGNOSTIC_COLUMNS]].mean()
            test = wilcoxon_paired(per_user["recall@20"].to_numpy(), per_user["recall@20_unadapted"].to_numpy())
            after, before = float(per_user["recall@20"].mean()), float(per_user["recall@20_unadapted"].mean())
            rows.append({"method": method, "recall@20": after, "recall@20_unadapted": before,
                         "gain": after - before, "p_value": test.p_value,
                         "overlap@20": float(per_user["overlap@20"].mean())})
        return pd.DataFrame(rows, columns=["method", "recall@20", "recall@20_unadapted", "gain",
                                           "p_value", "overlap@20"])

    def excluded_catalogue_users(self) -> dict[int, int]:
        """Per K, users with no relevant query item (NaN catalogue metrics, excluded)."""
        first = self.per_user.drop_duplicates(["k", "user_id"])
        return {int(k): int(g["recall@20"].isna().sum()) for k, g in first.groupby("k")}

    # ------------------------------------------------------------------ inner steps hook
    def set_recall_step_curves(self, curves: Mapping[str, Mapping[int, float]]) -> None:
        """Attach "catalogue Recall@20 against inner steps" curves: ``{method: {steps: recall}}``
        (the JSON and ``recall_vs_inner_steps.png``)."""
        self.recall_step_curves = {str(m): {int(s): float(v) for s, v in c.items()} for m, c in curves.items()}

    def set_inner_step_curves(self, curves: Mapping[str, Mapping[int, float]]) -> None:
        """Attach "MAE against inner steps" curves: ``{method: {steps: mae}}``.

        They go into the JSON and, in :meth:`save`, into ``mae_vs_inner_steps.png``.
        """
        checked = {}
        for method, curve in curves.items():
            points = {}
            for steps, value in curve.items():
                if isinstance(steps, bool) or int(steps) != steps or steps < 0:
                    raise ValueError(f"inner steps must be integers >= 0, got {steps!r} for {method!r}")
                points[int(steps)] = float(value)
            checked[str(method)] = dict(sorted(points.items()))
        self.inner_step_curves = checked

    # ------------------------------------------------------------------ output
    def to_markdown(self, digits: int = 3) -> str:
        """Tables of mean ± std over seeds: one per K, the headline K first.

        The headline table adds the Wilcoxon p-values of per-user MAE and catalogue
        Recall@20, each against the strongest baseline of that metric; a last table shows
        MAE against K.
        """
        info = self.protocol_info
        summary = self.summary()
        users = info.get("users", {})
        split = info.get("split", "test")
        lines = [
            f"# {info.get('protocol', 'Evaluation')} results ({split} users)",
            "",
            f"Users: {users.get('train', '?')} meta-train, {users.get('val', '?')} validation, "
            f"{users.get('test', '?')} test (evaluation users need ≥ "
            f"{info.get('eval_min_interactions', '?')} interactions). "
            f"Figures: mean over users, then mean ± std over seeds (deterministic methods: one run).",
            "nDCG@3 / nDCG@10 rank each user's query items; Recall@20 / nDCG@20 rank the "
            "catalogue minus the support (relevant = query items rated ≥ "
            f"{info.get('relevance_threshold', 4)}).",
            "Ties: nDCG@3 / nDCG@10 average the gain over items of equal predicted score "
            "(as scikit-learn's ndcg_score); the catalogue ranking puts equal scores in "
            "catalogue order.",
        ]
        excluded = {k: n for k, n in self.excluded_catalogue_users().items() if n}
        if excluded:
            lines.append("Users without a relevant query item, excluded from catalogue metrics: "
                         + ", ".join(f"K={k}: {n}" for k, n in excluded.items()) + ".")
        references = {m: self.strongest_baseline(metric=m) for m in MARKDOWN_TESTED_METRICS}
        tests = {m: self.paired_tests(metric=m) for m in MARKDOWN_TESTED_METRICS}
        strongest = self.strongest_baselines()
        if any(strongest.values()):
            where = ("validation" if self.baseline_choice_split == "val"
                     else "test (the report has no validation figures)")
            lines.append(f"Strongest baseline per metric at K = {self.headline_k}, chosen on {where} users: "
                         + "; ".join(f"{METRIC_LABELS[m]}: {b}" for m, b in strongest.items() if b) + ".")
        for k in [self.headline_k] + [k for k in self.k_values if k != self.headline_k]:
            headline = k == self.headline_k
            title = f"## K = {k}" + (" (headline)" if headline else "")
            header = ["Method"] + [METRIC_LABELS[m] for m in METRIC_COLUMNS]
            if headline:
                header += [f"p ({METRIC_LABELS[m]} vs {references[m]})"
                           for m in MARKDOWN_TESTED_METRICS if references[m]]
            lines += ["", title, "", "| " + " | ".join(header) + " |",
                      "|" + "|".join("---" for _ in header) + "|"]
            for _, row in summary[summary["k"] == k].iterrows():
                cells = [str(row["method"])] + [
                    format_mean_std(row[f"{m}_mean"], row[f"{m}_std"], digits) for m in METRIC_COLUMNS]
                if headline:
                    for m in MARKDOWN_TESTED_METRICS:
                        if references[m]:
                            p = tests[m].get(row["method"], {}).get("p_value")
                            cells.append("reference" if row["method"] == references[m] else _format_p(p))
                lines.append("| " + " | ".join(cells) + " |")
        diagnostic = self.personalization()
        if not diagnostic.empty:
            lines += ["", f"## Personalization at K = {self.headline_k}", "",
                      "Catalogue Recall@20 after and before adaptation to each user's support (the "
                      "meta-learned start, zero inner steps), the paired Wilcoxon test of the gain, "
                      "and the mean share of the top 20 that adaptation leaves in place.", "",
                      "| Method | Recall@20 adapted | unadapted | gain | p (gain) | top-20 overlap |",
                      "|---|---|---|---|---|---|"]
            for _, row in diagnostic.iterrows():
                lines.append(f"| {row['method']} | {row['recall@20']:.{digits}f} | "
                             f"{row['recall@20_unadapted']:.{digits}f} | {row['gain']:+.{digits}f} | "
                             f"{_format_p(row['p_value'])} | {row['overlap@20']:.2f} |")
        lines += ["", "## MAE against K", "", "| Method | " + " | ".join(f"K={k}" for k in self.k_values) + " |",
                  "|---|" + "|".join("---" for _ in self.k_values) + "|"]
        for method in self.methods:
            cells = []
            for k in self.k_values:
                hit = summary[(summary["method"] == method) & (summary["k"] == k)]
                cells.append("–" if hit.empty else format_mean_std(hit.iloc[0]["mae_mean"],
                                                                  hit.iloc[0]["mae_std"], digits))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        chosen = self._chosen_params()
        if chosen:
            lines += ["", "## Hyper-parameters in use (tuned ones chosen on validation users only)", ""]
            lines += [f"- {method}, K={k}: {params}" for (method, k), params in chosen.items()]
        return "\n".join(lines) + "\n"

    def _chosen_params(self) -> dict[tuple[str, int], str]:
        chosen = {}
        for run in self.runs:
            if run.get("params"):
                text = ", ".join(f"{key}={value}" for key, value in run["params"].items())
                chosen.setdefault((run["method"], run["k"]), text)
        return chosen

    def to_dict(self) -> dict[str, Any]:
        """Everything in JSON-able form, including every per-user figure."""
        return _jsonable({
            "protocol": self.protocol_info,
            "methods": self.methods,
            "baselines": self.baselines,
            "headline_k": self.headline_k,
            "strongest_baseline": self.strongest_baseline(),  # on MAE
            "strongest_baselines": {str(k): self.strongest_baselines(k) for k in self.k_values},
            "strongest_baselines_chosen_on": self.baseline_choice_split,
            "summary": self.summary().to_dict(orient="records"),
            "val_summary": (self.summary("val").to_dict(orient="records")
                            if self.val_per_user is not None else None),
            "paired_tests": {str(k): {m: self.paired_tests(k, m) for m in TESTED_METRICS}
                             for k in self.k_values},
            "excluded_catalogue_users": self.excluded_catalogue_users(),
            "personalization": {str(k): self.personalization(k).to_dict(orient="records")
                                for k in self.k_values},
            "runs": self.runs,
            "inner_step_curves": self.inner_step_curves,
            "recall_step_curves": self.recall_step_curves,
            "per_user": self.per_user.to_dict(orient="records"),
        })

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as strict JSON (NaN written as ``null``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``report.md``, ``report.json`` and the PNG plots into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": directory / "report.md"}
        paths["markdown"].write_text(self.to_markdown())
        paths["json"] = self.to_json(directory / "report.json")
        paths["mae_vs_k"] = self.plot_mae_vs_k(directory / "mae_vs_k.png")
        paths["recall_vs_k"] = self.plot_mae_vs_k(directory / "recall_vs_k.png", metric="recall@20")
        paths["headline_bars"] = self.plot_headline_bars(directory / "headline_metrics.png")
        if self.inner_step_curves:
            paths["mae_vs_inner_steps"] = plot_mae_vs_inner_steps(
                self.inner_step_curves, directory / "mae_vs_inner_steps.png")
        if self.recall_step_curves:
            paths["recall_vs_inner_steps"] = plot_mae_vs_inner_steps(
                self.recall_step_curves, directory / "recall_vs_inner_steps.png", metric="recall@20")
        return paths

    # ------------------------------------------------------------------ plots
    def plot_mae_vs_k(self, path: str | Path, metric: str = "mae") -> Path:
        """``metric`` (default MAE; mean ± std over seeds) against K, one line per method that
        reports it."""
        summary = self.summary()
        figure, axes = _figure(1, (6.0, 4.0))
        ax = axes[0]
        for method in self.methods:
            rows = summary[summary["method"] == method].sort_values("k")
            if not np.isfinite(rows[f"{metric}_mean"].to_numpy(dtype=np.float64)).any():
                continue
            ax.errorbar(rows["k"], rows[f"{metric}_mean"], yerr=rows[f"{metric}_std"], marker="o",
                        capsize=3, label=method)
        ax.set_xticks(self.k_values)
        ax.set_xlabel("support size K")
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        ax.set_ylabel(f"{METRIC_LABELS[metric]} ({better} is better)")
        ax.set_title(f"{METRIC_LABELS[metric]} against K")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return _save(figure, path)

    def plot_headline_bars(self, path: str | Path) -> Path:
        """Bars with std error bars for MAE, nDCG@3 and catalogue Recall@20 at the headline K."""
        summary = self.summary()
        at_k = summary[summary["k"] == self.headline_k]
        figure, axes = _figure(len(BAR_METRICS), (4.0 * len(BAR_METRICS), 4.0))
        positions = np.arange(len(at_k))
        for ax, metric in zip(axes, BAR_METRICS):
            ax.bar(positions, at_k[f"{metric}_mean"], yerr=at_k[f"{metric}_std"], capsize=3,
                   color=[f"C{i}" for i in range(len(at_k))])
            ax.set_xticks(positions)
            ax.set_xticklabels(at_k["method"], rotation=30, ha="right", fontsize=8)
            better = "lower" if metric in LOWER_IS_BETTER else "higher"
            ax.set_title(f"{METRIC_LABELS[metric]} at K={self.headline_k} ({better} is better)", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        return _save(figure, path)


def plot_mae_vs_inner_steps(curves: Mapping[str, Mapping[int, float]], path: str | Path,
                            metric: str = "mae") -> Path:
    """Plot ``{method: {inner steps: figure}}`` (MAE, or another ``metric``) as one line per
    method; returns the path."""
    if not curves:
        raise ValueError("curves is empty: pass {method: {steps: mae}}")
    figure, axes = _figure(1, (6.0, 4.0))
    ax = axes[0]
    for method, curve in curves.items():
        steps = sorted(int(s) for s in curve)
        ax.plot(steps, [float(curve[s]) for s in steps], marker="o", label=str(method))
    ax.set_xlabel("inner steps at adaptation")
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    ax.set_ylabel(f"{METRIC_LABELS[metric]} ({better} is better)")
    ax.set_title(f"{METRIC_LABELS[metric]} against inner steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, path)


# --------------------------------------------------------------------------- helpers
def _figure(columns: int, size: tuple[float, float]):
    # Figure + Agg canvas directly: no pyplot state and no global backend switch, so this
    # works headless and never disturbs a user's interactive matplotlib session.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _format_p(p: float | None) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _jsonable(value: Any) -> Any:
    """Recursively convert numpy / pandas values to JSON types; NaN / inf become None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)
