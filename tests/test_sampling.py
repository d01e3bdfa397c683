"""NegativeSampler: the distributions, the sampling corrections, seeding and bad input."""

import numpy as np
import pytest

from metarec.sampling import KINDS, NegativeSampler

COUNTS = np.array([0.0, 100.0, 10.0, 1.0, 0.0, 50.0])  # index 0 is the unknown item


def fitted(kind, **kwargs):
    return NegativeSampler(kind, **kwargs).fit(COUNTS)


def test_catalogue_is_every_item_without_correction():
    neg = fitted("catalogue").draw(step=3)
    real = neg.mask > 0
    assert sorted(neg.index[real].tolist()) == [1, 2, 3, 4, 5]
    assert np.all(neg.correction[real] == 0)
    assert np.all(neg.index[~real] == 0)


def test_uniform_and_popularity_probabilities():
    q = fitted("uniform").probabilities()
    np.testing.assert_allclose(q, [0, 0.2, 0.2, 0.2, 0.2, 0.2])
    pop = fitted("popularity", beta=1.0).probabilities()
    # An item nobody chose keeps the weight of one interaction.
    expected = np.array([0, 100, 10, 1, 1, 50]) / 162
    np.testing.assert_allclose(pop, expected)
    half = fitted("popularity", beta=0.5).probabilities()
    np.testing.assert_allclose(half[1] / half[2], np.sqrt(10))


def test_draws_follow_the_distribution_and_carry_log_m_q():
    sampler = fitted("popularity", beta=1.0, num_negatives=4000)
    neg = sampler.draw(step=0)
    q = sampler.probabilities()
    freq = np.bincount(neg.index[neg.mask > 0], minlength=6) / 4000
    np.testing.assert_allclose(freq, q, atol=0.03)
    np.testing.assert_allclose(neg.correction[neg.mask > 0], np.log(4000 * q[neg.index[neg.mask > 0]]),
                               rtol=1e-6)
    assert 0 not in neg.index[neg.mask > 0]


def test_draws_are_seeded_by_step_and_the_adaptation_draw_is_fixed():
    a, b = fitted("uniform", seed=1), fitted("uniform", seed=1)
    np.testing.assert_array_equal(a.draw(5).index, b.draw(5).index)
    assert not np.array_equal(a.draw(5).index, a.draw(6).index)
    np.testing.assert_array_equal(a.inference_draw().index, b.inference_draw().index)
    assert a.inference_draw() is a.inference_draw()


def test_in_batch_uses_the_batch_items_with_their_popularity():
    sampler = fitted("in_batch", num_negatives=4)
    neg = sampler.draw(0, batch_items=np.array([[1, 2, 0], [5, 0, 0]]))
    real = neg.index[neg.mask > 0]
    assert sorted(real.tolist()) == [1, 2, 5]
    q = COUNTS.clip(1) / COUNTS.clip(1)[1:].sum()
    np.testing.assert_allclose(neg.correction[neg.mask > 0], np.log(3 * q[real]), rtol=1e-6)
    capped = sampler.draw(0, batch_items=np.arange(1, 6).repeat(3))
    assert (capped.mask > 0).sum() == 4
    with pytest.raises(ValueError, match="batch_items=None"):
        sampler.draw(0)


def test_padded_lengths_are_few():
    assert len(fitted("uniform", num_negatives=100).draw(0).index) == 128
    assert len(fitted("uniform", num_negatives=3).draw(0).index) == 8


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "softmax"}, "kind='softmax'"),
    ({"num_negatives": 0}, "num_negatives=0"),
    ({"num_negatives": 2.5}, "num_negatives=2.5"),
    ({"beta": -1}, "beta=-1"),
    ({"beta": "x"}, "beta='x'"),
    ({"seed": "a"}, "seed='a'"),
])
def test_bad_settings_are_refused_quoting_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NegativeSampler(**kwargs)


@pytest.mark.parametrize("counts", [np.array([0.0, np.nan]), np.array([0.0, -1.0]), np.zeros((2, 2)),
                                    np.array([1.0])])
def test_bad_counts_are_refused(counts):
    with pytest.raises(ValueError, match="item_counts"):
        NegativeSampler().fit(counts)


@pytest.mark.parametrize("kind", KINDS)
def test_an_unfitted_sampler_says_what_to_do(kind):
    with pytest.raises(ValueError, match="not fitted"):
        NegativeSampler(kind).draw(0, batch_items=np.array([1]))


def test_config_round_trip():
    sampler = NegativeSampler("popularity", num_negatives=17, beta=0.3, seed=9)
    again = NegativeSampler.from_config(sampler.get_config())
    assert again.get_config() == sampler.get_config()
