"""Per-user metrics and statistics against hand-computed values."""

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from metarec.evaluation.stats import format_mean_std, mean_std, wilcoxon_paired
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

LOG3 = math.log2(3)  # discount of rank 2


def test_retraining_and_the_quickstart_import_the_metrics_without_the_evaluation_harness():
    code = ("import sys, metarec.metrics, metarec.retrain, metarec.quickstart; "
            "assert not [m for m in sys.modules if m.startswith('metarec.evaluation')]")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ----------------------------------------------------------------------------- MAE / RMSE
def test_mae_rmse_clip_predictions_to_the_rating_range():
    truth, predicted = [1, 5, 3], [0.0, 6.0, 3.5]
    # Clipped to [1, 5]: predictions 1, 5, 3.5 → errors 0, 0, 0.5.
    assert mae(truth, predicted, (1, 5)) == pytest.approx(0.5 / 3)
    assert rmse(truth, predicted, (1, 5)) == pytest.approx(math.sqrt(0.25 / 3))
    # Without a range the raw errors 1, 1, 0.5 count.
    assert mae(truth, predicted) == pytest.approx(2.5 / 3)
    assert rmse(truth, predicted) == pytest.approx(math.sqrt(2.25 / 3))


def test_clip_to_range_is_identity_without_range_and_rejects_bad_range():
    np.testing.assert_array_equal(clip_to_range([0.0, 9.0], None), [0.0, 9.0])
    np.testing.assert_array_equal(clip_to_range([0.0, 9.0], (1, 5)), [1.0, 5.0])
    with pytest.raises(ValueError, match=r"\(5, 1\)"):
        clip_to_range([1.0], (5, 1))


def test_error_metrics_edge_cases():
    assert math.isnan(mae([], []))
    assert math.isnan(rmse([], []))
    assert mae([3.0], [3.0]) == 0.0
    with pytest.raises(ValueError, match="2 and 1"):
        mae([1, 2], [1])
    with pytest.raises(ValueError, match="finite"):
        rmse([1.0], [np.nan])


# ----------------------------------------------------------------------------- ranking order
def test_rank_order_breaks_ties_by_input_order():
    np.testing.assert_array_equal(rank_order([1.0, 3.0, 1.0, 3.0]), [1, 3, 0, 2])
    np.testing.assert_array_equal(rank_items([7, 8, 9], [1.0, 3.0, 1.0]), [8, 7, 9])
    np.testing.assert_array_equal(rank_items([7, 8, 9], [1.0, 3.0, 1.0], k=2), [8, 7])


def test_rank_order_rejects_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        rank_order([1.0, np.nan])


# ----------------------------------------------------------------------------- nDCG (graded)
def test_ndcg_perfect_ranking_is_one():
    assert ndcg_at_k([5, 3, 1], [0.9, 0.5, 0.1], 3) == pytest.approx(1.0)


def test_ndcg_reversed_ranking_matches_hand_computation():
    # Gains 2^r - 1 = 31, 7, 1; the scores rank them 1, 7, 31.
    dcg = 1 / 1 + 7 / LOG3 + 31 / 2
    idcg = 31 / 1 + 7 / LOG3 + 1 / 2
    assert ndcg_at_k([5, 3, 1], [0.1, 0.5, 0.9], 3) == pytest.approx(dcg / idcg)
    # Truncated at k=1: the worst item on top, against the best one.
    assert ndcg_at_k([5, 3, 1], [0.1, 0.5, 0.9], 1) == pytest.approx(1 / 31)


def test_ndcg_ties_keep_input_order():
    # Equal scores: the first item in the input takes rank 1.
    assert ndcg_at_k([1, 5], [2.0, 2.0], 2) == pytest.approx((1 + 31 / LOG3) / (31 + 1 / LOG3))
    assert ndcg_at_k([5, 1], [2.0, 2.0], 2) == pytest.approx(1.0)


def test_ndcg_k_larger_than_the_list_uses_the_whole_list():
    expected = (3 + 15 / LOG3) / (15 + 3 / LOG3)  # ratings 2 and 4 in the wrong order
    assert ndcg_at_k([4, 2], [0.0, 1.0], 10) == pytest.approx(expected)
    assert ndcg_at_k([4, 2], [0.0, 1.0], 10) == ndcg_at_k([4, 2], [0.0, 1.0], 2)


def test_ndcg_undefined_cases_are_nan_and_bad_k_is_rejected():
    assert math.isnan(ndcg_at_k([], [], 3))
    assert math.isnan(ndcg_at_k([0, 0], [0.3, 0.1], 3))  # implicit user with no positive
    with pytest.raises(ValueError, match="0"):
        ndcg_at_k([1], [1], 0)
    with pytest.raises(ValueError, match="2.5"):
        ndcg_at_k([1], [1], 2.5)


# ----------------------------------------------------------------------------- catalogue
RANKED = [10, 20, 30, 40, 50]
RELEVANT = {20, 50, 99}  # 99 is not in the ranking at all


def test_catalogue_recall_uses_min_k_relevant_denominator():
    assert catalogue_recall_at_k(RANKED, RELEVANT, 2) == pytest.approx(1 / 2)  # 1 hit of min(2, 3)
    assert catalogue_recall_at_k(RANKED, RELEVANT, 5) == pytest.approx(2 / 3)
    assert catalogue_recall_at_k(RANKED, RELEVANT, 100) == pytest.approx(2 / 3)  # k > list
    assert catalogue_recall_at_k(np.array(RANKED), np.array([20, 50, 99]), 5) == pytest.approx(2 / 3)


def test_catalogue_ndcg_binary_gain():
    dcg = 1 / LOG3 + 1 / math.log2(6)  # hits at ranks 2 and 5
    idcg = 1 + 1 / LOG3 + 1 / 2  # three relevant items at ranks 1..3
    assert catalogue_ndcg_at_k(RANKED, RELEVANT, 5) == pytest.approx(dcg / idcg)
    assert catalogue_ndcg_at_k(RANKED, RELEVANT, 100) == pytest.approx(dcg / idcg)


def test_catalogue_perfect_and_reversed_rankings():
    perfect = [20, 50, 10, 30, 40]
    assert catalogue_recall_at_k(perfect, {20, 50}, 2) == 1.0
    assert catalogue_ndcg_at_k(perfect, {20, 50}, 2) == pytest.approx(1.0)
    reversed_ = perfect[::-1]
    assert catalogue_recall_at_k(reversed_, {20, 50}, 2) == 0.0
    assert catalogue_ndcg_at_k(reversed_, {20, 50}, 2) == 0.0


def test_catalogue_metrics_nan_without_relevant_items():
    assert math.isnan(catalogue_recall_at_k(RANKED, set(), 5))
    assert math.isnan(catalogue_ndcg_at_k(RANKED, [], 5))


def test_catalogue_rejects_repeated_items():
    with pytest.raises(ValueError, match="repeat"):
        catalogue_recall_at_k([1, 1, 2], {1}, 3)


# ----------------------------------------------------------------------------- statistics
def test_wilcoxon_detects_a_consistent_difference_and_matches_scipy():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 1.2, size=40)
    a = b + rng.uniform(0.05, 0.15, size=40)  # method a is worse for every user
    result = wilcoxon_paired(a, b)
    assert result.p_value < 1e-6
    assert result.n == 40
    assert result.median_difference > 0
    assert result.p_value == pytest.approx(scipy_stats.wilcoxon(a - b).pvalue)


def test_wilcoxon_drops_nan_users_and_handles_identical_methods():
    a = np.array([0.1, np.nan, 0.3, 0.4])
    assert wilcoxon_paired(a, a).p_value == 1.0
    assert wilcoxon_paired(a, a).n == 3
    assert math.isnan(wilcoxon_paired([np.nan], [1.0]).p_value)
    with pytest.raises(ValueError, match=r"\(2,\) and \(3,\)"):
        wilcoxon_paired([1, 2], [1, 2, 3])


def test_mean_std_over_seeds():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))  # sample std
    assert mean_std([0.8]) == (0.8, 0.0)
    assert mean_std([1.0, np.nan, 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))
    assert all(math.isnan(v) for v in mean_std([]))
    assert format_mean_std(0.8321, 0.0041) == "0.832 ± 0.004"
    assert format_mean_std(0.8321, 0.0) == "0.832"
    assert format_mean_std(float("nan"), 0.0) == "–"
