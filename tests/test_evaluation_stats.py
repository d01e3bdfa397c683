"""The paired significance test of evaluation reports (numpy and scipy only)."""

import numpy as np
import pytest
from scipy import stats

from metarec.evaluation.stats import wilcoxon_paired


def test_a_clear_difference_is_significant_and_its_sign_is_the_median_difference():
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 1, 40)
    a = b + rng.uniform(0.05, 0.15, 40)
    result = wilcoxon_paired(a, b)
    assert result.p_value < 1e-6 and result.n == 40 and result.median_difference > 0
    assert result.p_value == pytest.approx(stats.wilcoxon(a - b).pvalue)


def test_rounding_error_of_a_mean_over_seeds_is_a_tie_not_a_win():
    # Three seeds of a deterministic method: the mean of three equal recalls differs from the
    # recall itself in the last bit (0.1 + 0.1 + 0.1 = 0.30000000000000004).
    rng = np.random.default_rng(1)
    b = np.round(rng.uniform(0, 1, 30), 1)
    a = (b + b + b) / 3
    assert np.any(a != b)
    assert wilcoxon_paired(a, b).p_value == 1.0
    # Half the users tied that way, half clearly better: only the real differences count.
    a[:15] += 0.2
    with_ties = wilcoxon_paired(a, b)
    only_real = stats.wilcoxon(a[:15] - b[:15])
    assert with_ties.p_value == pytest.approx(only_real.pvalue)


def test_users_without_the_figure_are_left_out_and_bad_shapes_are_refused():
    a = np.array([0.5, np.nan, 0.7, 0.2])
    b = np.array([0.1, 0.3, np.nan, 0.1])
    assert wilcoxon_paired(a, b).n == 2
    assert np.isnan(wilcoxon_paired([np.nan], [0.1]).p_value)
    with pytest.raises(ValueError, match=r"got shapes \(3,\) and \(2,\)"):
        wilcoxon_paired([0.1, 0.2, 0.3], [0.1, 0.2])
