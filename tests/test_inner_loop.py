"""The inner loop's guard: non-finite steps are dropped, large ones clipped to a global norm."""

import numpy as np
import pytest
from keras import ops

from metarec.inner_loop import guard_gradients


def _np(tensors):
    return [np.asarray(ops.convert_to_numpy(t)) for t in tensors]


def test_small_finite_gradients_pass_unchanged():
    grads = [np.array([0.3, -0.4], "float32"), np.array([[1.2]], "float32")]
    out = _np(guard_gradients([ops.convert_to_tensor(g) for g in grads], clipnorm=5.0))
    for a, b in zip(out, grads):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_large_gradients_are_scaled_to_the_global_norm():
    grads = [np.array([30.0, -40.0], "float32"), np.array([[0.0]], "float32")]
    out = _np(guard_gradients([ops.convert_to_tensor(g) for g in grads], clipnorm=5.0))
    norm = np.sqrt(sum(np.sum(o ** 2) for o in out))
    assert norm == pytest.approx(5.0, rel=1e-5)
    np.testing.assert_allclose(out[0], [3.0, -4.0], rtol=1e-5)  # direction kept


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("clipnorm", [5.0, None])
def test_a_non_finite_step_is_dropped_whole(bad, clipnorm):
    grads = [np.array([0.3, bad], "float32"), np.array([[1.2]], "float32")]
    out = _np(guard_gradients([ops.convert_to_tensor(g) for g in grads], clipnorm=clipnorm))
    for o in out:
        assert np.all(o == 0.0), o
