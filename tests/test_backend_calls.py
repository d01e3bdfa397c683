"""The compiled-call wrapper of the TensorFlow backend (``backend.jit(fn, xla=True)``).

It calls a ``tf.function``'s concrete functions directly; these tests pin that it returns
what the ``tf.function`` returns, traces once per input signature, and follows changes of
shape, dtype and nesting.
"""

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":
    pytest.skip("TensorFlow backend only", allow_module_level=True)

import tensorflow as tf  # noqa: E402

from metarec.backend import tensorflow as tf_backend  # noqa: E402


def make():
    traces = []

    def fn(params, inputs, mask):
        traces.append(1)  # runs only while tracing
        h = tf.matmul(inputs["x"], params[0]) + params[1]
        return {"out": tf.reduce_sum(h * mask[:, None], axis=0), "n": tf.shape(inputs["ids"])[0]}, [h]

    return tf_backend.jit(fn, xla=True), tf.function(fn, jit_compile=True), traces


def args(rows=4, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    params = [tf.constant(rng.normal(size=(3, 2)), tf.float32), tf.constant(rng.normal(size=(2,)), tf.float32)]
    inputs = {"x": rng.normal(size=(rows, 3)).astype(dtype), "ids": np.arange(rows, dtype=np.int32)}
    return params, inputs, np.ones(rows, np.float32)


def test_results_equal_the_tf_function():
    fast, plain, _ = make()
    for rows in (4, 7):
        got, want = fast(*args(rows)), plain(*args(rows))
        tf.nest.assert_same_structure(got, want)
        for g, w in zip(tf.nest.flatten(got), tf.nest.flatten(want)):
            np.testing.assert_array_equal(g.numpy(), w.numpy())


def test_one_trace_per_signature_and_new_values_are_used():
    fast, _, traces = make()
    first = fast(*args(4, seed=0))
    second = fast(*args(4, seed=1))  # same signature, new values: no trace, new result
    assert len(traces) == 1
    assert not np.allclose(first[0]["out"].numpy(), second[0]["out"].numpy())
    fast(*args(6))  # a new shape traces
    assert len(traces) == 2
    fast(*args(4))
    assert len(traces) == 2


def test_dtype_and_nesting_changes_trace_anew():
    fast, _, traces = make()
    fast(*args(4))
    params, inputs, mask = args(4)
    inputs["x"] = inputs["x"].astype(np.float64)
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        fast(params, inputs, mask)  # float64 against float32 weights: the trace itself fails
    assert len(traces) == 2
    params, inputs, mask = args(4)
    inputs["extra"] = np.zeros(4, np.float32)  # another key: another signature
    fast(params, inputs, mask)
    assert len(traces) == 3


def test_variables_are_read_when_the_kernel_runs():
    fast, plain, traces = make()
    params, inputs, mask = args(4)
    variables = [tf.Variable(p) for p in params]
    before = fast(variables, inputs, mask)[0]["out"].numpy()
    np.testing.assert_array_equal(before, plain(variables, inputs, mask)[0]["out"].numpy())
    traced = len(traces)  # one trace each for the wrapper and the plain tf.function
    variables[1].assign(variables[1] + 1.0)  # e.g. a training step between two calls
    after = fast(variables, inputs, mask)[0]["out"].numpy()
    np.testing.assert_allclose(after, before + 4.0, rtol=1e-6)  # 4 rows, mask 1: +1 each
    assert len(traces) == traced
    fast(params, inputs, mask)  # tensors where variables were: another signature
    assert len(traces) == traced + 1


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2],   # a strided view
    np.arange(6, dtype=np.int64)[::-1],                       # negative strides
    np.array([True, False]),
    np.array(3.5, dtype=np.float32),                          # 0-d
    np.zeros((0, 5), np.int32),                               # empty
    np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
])
def test_direct_array_conversion_equals_convert_to_tensor(array):
    """Kernel arguments skip tf.convert_to_tensor's dispatch; the tensor must be the same."""
    got, want = tf_backend._tensor(array), tf.convert_to_tensor(array)
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert isinstance(tf_backend._tensor([1.0, 2.0]), tf.Tensor)  # non-arrays: the plain path


def test_arrays_the_direct_conversion_refuses_take_the_public_path():
    """An array the direct conversion cannot take gets tf.convert_to_tensor's own result or
    its own error, never a different one."""
    strings = np.array(["a", "bc"])
    np.testing.assert_array_equal(tf_backend._tensor(strings).numpy(), tf.convert_to_tensor(strings).numpy())
    with pytest.raises((ValueError, TypeError)):
        tf_backend._tensor(np.array([{"a": 1}], dtype=object))
