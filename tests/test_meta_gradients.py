"""Meta-gradients are checked numerically and across backends.

Each backend runs ``tests/gradcheck.py`` in its own process (float64 is process-wide on JAX).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.gradcheck import episode

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("tensorflow", "jax")


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    out = {}
    for name in BACKENDS:
        path = tmp_path_factory.mktemp(name) / "grads.npz"
        env = dict(os.environ, KERAS_BACKEND=name)
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "gradcheck.py"), str(path)],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = dict(np.load(path))
    return out


@pytest.mark.parametrize("name", BACKENDS)
def test_second_order_matches_finite_differences(gradients, name):
    g = gradients[name]
    np.testing.assert_allclose(g["second_order"], g["finite_difference"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", BACKENDS)
def test_proximal_inner_term_matches_finite_differences(gradients, name):
    g = gradients[name]
    np.testing.assert_allclose(g["proximal"], g["proximal_finite_difference"], rtol=1e-5, atol=1e-7)
    assert np.abs(g["proximal"] - g["second_order"]).max() > 1e-4  # the term changes the gradient


@pytest.mark.parametrize("name", BACKENDS)
def test_catalogue_objective_matches_finite_differences(gradients, name):
    # Softmax of liked items against sampled negatives (accidental hits and padding left out,
    # sampling corrections applied) plus the rating head's error, through two inner steps.
    g = gradients[name]
    np.testing.assert_allclose(g["catalogue"], g["catalogue_finite_difference"], rtol=1e-5, atol=1e-7)
    assert np.abs(g["catalogue_first_order"] - g["catalogue_finite_difference"]).max() > 1e-4


@pytest.mark.parametrize("name", BACKENDS)
def test_first_order_differs_from_exact(gradients, name):
    g = gradients[name]
    gap = np.abs(g["first_order"] - g["finite_difference"]).max()
    assert gap > 1e-3, "first-order MAML should drop the second-order terms"


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("form", ["andrychowicz", "ravi_larochelle"])
def test_lstm_meta_learner_matches_finite_differences(gradients, name, form):
    # Through two steps of the learned rule, into the initialisation and the rule's weights.
    g = gradients[name]
    key = f"lstm_{form}"
    assert np.abs(g[key + "_rule"]).max() > 1e-3  # the rule itself is meta-trained
    np.testing.assert_allclose(g[key], g[key + "_finite_difference"], rtol=1e-5, atol=1e-7)
    # First order: what the rule reads is a constant, so the second-order terms are gone.
    assert np.abs(g[key + "_first_order"] - g[key + "_finite_difference"]).max() > 1e-4


def test_backends_agree(gradients):
    for key in ("second_order", "first_order", "reptile_after", "catalogue", "lstm_andrychowicz",
                "lstm_ravi_larochelle"):
        np.testing.assert_allclose(
            gradients["tensorflow"][key], gradients["jax"][key], rtol=1e-9, atol=1e-10
        )


def _forward(w, x):
    h = 1.0 / (1.0 + np.exp(-(x @ w[0] + w[1])))
    return h, (h @ w[2] + w[3]).ravel()


def _sgd_reference(w, x, t, m, steps, lr):
    """Hand-written backprop of the masked squared error of the tiny model."""
    w = [a.copy() for a in w]
    for _ in range(steps):
        h, y = _forward(w, x)
        dy = 2.0 * m * (y - t) / max(m.sum(), 1.0)
        dh = np.outer(dy, w[2].ravel())
        dz = dh * h * (1.0 - h)
        grads = [x.T @ dz, dz.sum(0), (h.T @ dy).reshape(w[2].shape), np.array([dy.sum()])]
        w = [a - lr * g for a, g in zip(w, grads)]
    return w


@pytest.mark.parametrize("name", BACKENDS)
def test_reptile_update_equals_definition(gradients, name):
    g = gradients[name]
    shapes = [(3, 4), (4,), (4, 1), (1,)]
    flat, w0, start = g["reptile_before"], [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        w0.append(flat[start:start + size].reshape(shape))
        start += size
    ep = episode()
    adapted = []
    for u in range(3):
        x = np.concatenate([ep.support["x"][u], ep.query["x"][u]])
        t = np.concatenate([ep.support_y[u], ep.query_y[u]])
        m = np.concatenate([ep.support_mask[u], ep.query_mask[u]])
        adapted.append(_sgd_reference(w0, x, t, m, steps=3, lr=0.2))
    expected = [a + 0.5 * (np.mean([w[i] for w in adapted], axis=0) - a) for i, a in enumerate(w0)]
    np.testing.assert_allclose(
        g["reptile_after"], np.concatenate([e.ravel() for e in expected]), rtol=1e-8, atol=1e-10
    )


def test_memory_learner_meta_gradient_matches_finite_differences(gradients):
    # Through the GRU reader, the FiLM heads, the shared representation and one inner step.
    # On JAX, Keras's GRU computes its tanh in float32 even under float64, which makes central
    # differences noisy there; JAX's analytic gradient is held to TensorFlow's instead.
    g = gradients["tensorflow"]
    assert np.abs(g["memory_reader"]).max() > 1e-3  # the reader itself is meta-trained
    np.testing.assert_allclose(g["memory"], g["memory_finite_difference"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gradients["jax"]["memory"], g["memory"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BACKENDS)
def test_inactive_clip_leaves_meta_gradients_exact(gradients, name):
    g = gradients[name]
    np.testing.assert_allclose(g["clip_inactive"], g["second_order"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", BACKENDS)
def test_active_clip_factor_is_a_constant_of_the_meta_gradient(gradients, name):
    g = gradients[name]
    np.testing.assert_allclose(g["clip_active"], g["clip_active_reference"], rtol=1e-9, atol=1e-11)
    assert np.abs(g["clip_active"] - g["clip_unclipped"]).max() > 1e-4  # the clip was active
