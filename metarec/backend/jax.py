"""JAX implementations of the backend primitives (see ``metarec.backend``)."""

import jax
import numpy as np


def value_and_grad(fn, has_aux=False):
    """Value and gradient of ``fn(params, *args)`` with respect to the list ``params``."""
    vg = jax.value_and_grad(fn, argnums=0, has_aux=has_aux)

    def wrapped(params, *args):
        out, grads = vg(list(params), *args)
        return out, list(grads)

    return wrapped


def vmap(fn, in_axes):
    return jax.vmap(fn, in_axes=tuple(in_axes))


def jit(fn, xla=False):
    """``jax.jit``. JAX always compiles with XLA: ``xla`` (default False, as on TensorFlow) is
    accepted so that both backends take the same call, and changes nothing here."""
    return jax.jit(fn)


def enable_compilation_cache(path):
    """Keep compiled XLA programs in the folder ``path`` across processes (JAX's persistent
    compilation cache, every program however quick to compile): a restarted process loads
    them instead of compiling again. Returns True."""
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return True


def to_numpy(x):
    return np.asarray(x)


class TrainStep:
    """One jitted meta-update with ``optimizer.stateless_apply``.

    JAX cannot mutate Keras variables inside ``jax.jit``: parameters and optimizer state live
    here as arrays during ``fit`` and ``sync()`` writes them back to the variables: at each
    epoch's end, and mid-epoch only when a callback asks for the model
    (``MetaLearner.jax_state_sync``, which Keras's ``Callback.model`` calls).
    """

    def __init__(self, grad_fn, optimizer, variables, non_trainable_variables):
        self.optimizer = optimizer
        self.variables = list(variables)
        self.non_trainable_variables = list(non_trainable_variables)
        optimizer.build(self.variables)
        self._non_trainable = [v.value for v in self.non_trainable_variables]
        self.reload()

        def step(params, opt_state, non_trainable, batch):
            logs, grads = grad_fn(params, non_trainable, batch)
            params, opt_state = optimizer.stateless_apply(opt_state, grads, params)
            return logs, params, opt_state

        # No buffer donation: the arrays may also be held by the Keras variables after sync().
        self._step = jax.jit(step)

    def __call__(self, batch):
        logs, self._params, self._opt_state = self._step(
            self._params, self._opt_state, self._non_trainable, batch
        )
        return logs

    def sync(self):
        for var, value in zip(self.variables, self._params):
            var.assign(value)
        for var, value in zip(self.optimizer.variables, self._opt_state):
            var.assign(value)

    def reload(self):
        """Re-read the variables (after a callback changed the weights)."""
        self._params = [v.value for v in self.variables]
        self._opt_state = [v.value for v in self.optimizer.variables]


def kernel_weights(values):
    """Variables' values for a compiled call (on JAX they already are plain arrays)."""
    return list(values)
