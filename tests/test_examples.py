"""The runnable tutorials in examples/, at toy sizes: they must keep working as written."""

import os
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)


def test_linear_tasks_tutorial(tmp_path):
    import linear_tasks

    curves = linear_tasks.run(num_train=96, num_test=32, epochs=2, out=str(tmp_path), max_steps=2)
    assert (tmp_path / "loss_vs_inner_steps.png").stat().st_size > 1000
    assert len(curves) == 7
    for name, curve in curves.items():
        assert list(curve) == [0, 1, 2]
        assert all(np.isfinite(v) for v in curve.values()), name
    # Pre-training learns the average line; a gradient step on the support set then helps.
    pretrained = curves["pre-training + fine-tuning"]
    assert pretrained[2] < pretrained[0]


def test_linear_tasks_are_random_lines():
    import linear_tasks

    tasks = linear_tasks.make_tasks(50, seed=0, noise=0.0)
    x = np.concatenate([tasks.support_x["x"], tasks.query_x["x"]], axis=1)[..., 0]
    y = np.concatenate([tasks.support_y, tasks.query_y], axis=1)
    # Noise-free points of one task lie on one line: a least-squares fit is exact.
    for t in range(5):
        a, b = np.polyfit(x[t], y[t], 1)
        np.testing.assert_allclose(a * x[t] + b, y[t], atol=1e-4)
    assert len(tasks) == 50
