"""Floors under the S1 batch and single-call figures, on the current Keras backend.

* the two scoring layers of the S1 model (99-64-64, user part one row) as one batched product
  over 1,024 users x 1,024 candidates with per-user weights: what scoring with a candidate
  list per user costs before any gather, adaptation or host work;
* on TensorFlow, turning one small numpy array into a tensor through ``tf.convert_to_tensor``
  and through the direct conversion the compiled kernel calls use.

    KERAS_BACKEND=tensorflow python bench/kernel_floor.py
    KERAS_BACKEND=jax python bench/kernel_floor.py
"""

import json
import time
import timeit

import numpy as np
from keras import ops

from metarec import backend

USERS, CANDIDATES, ITEM_FEATURES, HIDDEN = 1024, 1024, 66, 64


def batched_scoring_ms(repeats=5):
    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.random((USERS, CANDIDATES, ITEM_FEATURES), np.float32))
    w1 = ops.convert_to_tensor(rng.random((USERS, ITEM_FEATURES, HIDDEN), np.float32))
    w2 = ops.convert_to_tensor(rng.random((USERS, HIDDEN, HIDDEN), np.float32))
    layers = backend.jit(lambda x, w1, w2: ops.matmul(ops.relu(ops.matmul(x, w1)), w2), xla=True)
    backend.to_numpy(layers(x, w1, w2))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.to_numpy(layers(x, w1, w2))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def conversion_us(n=20000):
    if backend.BACKEND != "tensorflow":
        return None
    import tensorflow as tf

    from metarec.backend import tensorflow as tf_backend

    a = np.zeros((1, 24), np.float32)
    return {"tf.convert_to_tensor": timeit.timeit(lambda: tf.convert_to_tensor(a), number=n) / n * 1e6,
            "direct": timeit.timeit(lambda: tf_backend._tensor(a), number=n) / n * 1e6}


if __name__ == "__main__":
    print(json.dumps({"backend": backend.BACKEND, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "batched_scoring_layers_ms": round(batched_scoring_ms(), 1),
                      "array_to_tensor_us": conversion_us()}, indent=1))
