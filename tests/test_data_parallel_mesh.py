"""Data-parallel meta-training on a 4-device CPU mesh (JAX), in its own process.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` only works if set before JAX starts, so
``tests/mesh_checks.py`` runs under pytest in a subprocess with it. Those checks are JAX's
alone: under the TensorFlow backend this test is skipped (``tests/test_data_parallel.py`` checks
TensorFlow's refusal).
"""

import os
import re
import subprocess
import sys

import keras
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = 10  # test functions (with parameters) in mesh_checks.py


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="meshes are JAX's (see the module doc)")
def test_four_device_mesh_matches_one_device():
    # One thread per XLA CPU device: four of them share this machine's cores.
    flags = ("--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false "
             "intra_op_parallelism_threads=1")
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS=flags)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
         "ignore::DeprecationWarning", os.path.join(HERE, "mesh_checks.py")],
        env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(HERE),
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert re.search(rf"\b{CHECKS} passed\b", proc.stdout), proc.stdout[-2000:]
