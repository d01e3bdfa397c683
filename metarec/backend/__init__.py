"""The only place where metarec touches a specific Keras backend.

Keras 3 has no backend-neutral ``grad``, ``vmap`` or ``jit``. Each supported backend gets one
small module with the same four functions; everything else in metarec is written with
``keras.ops`` and ``Model.stateless_call`` and calls them through this package:

* ``value_and_grad(fn, has_aux=False)``: ``fn(params, *args)`` -> ``(value, grads)`` with the
  gradient taken with respect to ``params`` (a list of tensors). Nested use gives true
  second-order derivatives.
* ``vmap(fn, in_axes)``: vectorise ``fn`` over the leading axis of the arguments whose
  ``in_axes`` entry is 0; ``None`` arguments are shared.
* ``jit(fn)``: compile ``fn``.
* ``kernel_weights(values)``: variables' values as the compiled kernels of ``jit(fn, xla=True)``
  take them (JAX arrays; on TensorFlow the variables, read when the kernel runs).
* ``TrainStep``: applies a meta-gradient function and a Keras optimizer in one compiled step.
"""

import keras

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    from metarec.backend.tensorflow import TrainStep, kernel_weights, jit, to_numpy, value_and_grad, vmap
elif BACKEND == "jax":
    from metarec.backend.jax import TrainStep, kernel_weights, jit, to_numpy, value_and_grad, vmap
else:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"metarec supports the 'tensorflow' and 'jax' Keras backends; KERAS_BACKEND is {BACKEND!r}."
    )

__all__ = ["BACKEND", "TrainStep", "kernel_weights", "jit", "to_numpy", "value_and_grad", "vmap"]
