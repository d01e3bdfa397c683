"""The only place where metarec touches a specific Keras backend.

Keras 3 has no backend-neutral ``grad``, ``vmap`` or ``jit``. Each supported backend gets one
small module with the same seven functions and one class; everything else in metarec is written
with ``keras.ops`` and ``Model.stateless_call`` and calls them through this package:

* ``value_and_grad(fn, has_aux=False)``: ``fn(params, *args)`` -> ``(value, grads)`` with the
  gradient taken with respect to ``params`` (a list of tensors). Nested use gives true
  second-order derivatives.
* ``vmap(fn, in_axes)``: vectorise ``fn`` over the leading axis of the arguments whose
  ``in_axes`` entry is 0; ``None`` arguments are shared.
* ``jit(fn, xla=False)``: compile ``fn``; the same default on both backends. ``xla=True`` asks for
  one whole-program XLA compilation, which the per-user programs use (``metarec.runtime.kernels``):
  on TensorFlow ``tf.function(jit_compile=True)`` called through its concrete functions, on JAX
  ``jax.jit``, which always compiles with XLA (there the flag changes nothing). With the default,
  TensorFlow builds a plain ``tf.function`` graph (the meta-training step is faster without XLA).
* ``kernel_weights(values)``: variables' values as the compiled kernels of ``jit(fn, xla=True)``
  take them (JAX arrays; on TensorFlow the variables, read when the kernel runs).
* ``to_numpy(x)``: a tensor's value as a numpy array.
* ``enable_compilation_cache(path)``: keep compiled programs in a folder across processes
  (JAX's persistent cache; returns False on TensorFlow, which has none to turn on here).
* ``TrainStep``: applies a meta-gradient function and a Keras optimizer in one compiled step
  (on JAX, optionally data-parallel over a ``user_mesh``).
* ``user_mesh(distribution)``: the placement of meta-batches on the devices of a
  ``keras.distribution.DataParallel`` (users split, weights replicated); JAX only, a
  ``ValueError`` naming the fix on TensorFlow.
"""

import keras

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    from metarec.backend.tensorflow import (TrainStep, enable_compilation_cache, kernel_weights, jit, to_numpy,
                                           user_mesh, value_and_grad, vmap)
elif BACKEND == "jax":
    from metarec.backend.jax import (TrainStep, enable_compilation_cache, kernel_weights, jit, to_numpy,
                                     user_mesh, value_and_grad, vmap)
else:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"metarec supports the 'tensorflow' and 'jax' Keras backends; KERAS_BACKEND is {BACKEND!r}."
    )

__all__ = ["BACKEND", "TrainStep", "enable_compilation_cache", "kernel_weights", "jit", "to_numpy",
           "user_mesh", "value_and_grad", "vmap"]
