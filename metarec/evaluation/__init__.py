"""Evaluation of cold-start recommenders: protocol Q1, metrics, baselines, statistics, reports.

Typical use::

    from metarec.datasets import load_movielens
    from metarec.evaluation import Q1Protocol, GlobalMean, ItemMean, ItemMeanUserOffset, run_evaluation

    protocol = Q1Protocol(load_movielens("../shared/data/ml-100k"))
    report = run_evaluation(protocol, [GlobalMean(), ItemMean(), ItemMeanUserOffset()])
    print(report.to_markdown())
    report.save("results/q1")
"""

from metarec.evaluation.methods import (
    GlobalMean,
    ItemMean,
    ItemMeanUserOffset,
    LearnerMethod,
    Method,
    TunableMethod,
    UserQuery,
    queries_from_tasks,
)
from metarec.metrics import (
    catalogue_ndcg_at_k,
    catalogue_recall_at_k,
    clip_to_range,
    mae,
    ndcg_at_k,
    rank_items,
    rank_order,
    rmse,
)
from metarec.evaluation.neural import FineTune, GlobalModel, inner_step_curve, meta_learner_method
from metarec.evaluation.protocol import METRIC_COLUMNS, Q1Protocol
from metarec.evaluation.ranking_baselines import EASE, ImplicitALS, ItemKNN, MostPopular, RankingBaseline
from metarec.evaluation.report import ProgressBar, Report, plot_mae_vs_inner_steps, run_evaluation
from metarec.evaluation.stats import WilcoxonResult, format_mean_std, mean_std, wilcoxon_paired

__all__ = [
    "EASE",
    "METRIC_COLUMNS",
    "FineTune",
    "GlobalMean",
    "GlobalModel",
    "ImplicitALS",
    "ItemKNN",
    "ItemMean",
    "ItemMeanUserOffset",
    "LearnerMethod",
    "Method",
    "MostPopular",
    "ProgressBar",
    "Q1Protocol",
    "RankingBaseline",
    "Report",
    "TunableMethod",
    "UserQuery",
    "WilcoxonResult",
    "catalogue_ndcg_at_k",
    "catalogue_recall_at_k",
    "clip_to_range",
    "format_mean_std",
    "inner_step_curve",
    "mae",
    "mean_std",
    "meta_learner_method",
    "ndcg_at_k",
    "plot_mae_vs_inner_steps",
    "queries_from_tasks",
    "rank_items",
    "rank_order",
    "rmse",
    "run_evaluation",
    "wilcoxon_paired",
]
