"""JAX implementations of the backend primitives (see ``metarec.backend``)."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


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


class UserMesh:
    """Data parallelism over the users of a meta-batch, on the device mesh of a
    ``keras.distribution.DataParallel``.

    Per-user arrays (an episode's, leading axis = users) are split along the distribution's
    batch axis, one slice of users per device; everything else (weights, optimizer state, a
    catalogue objective's shared negatives) is replicated. Compiled on such inputs, the
    meta-step runs each device's users where they are, and XLA's partitioner turns the mean
    over users into a cross-device reduction (an all-reduce): every device ends the step with
    the same averaged meta-gradient and the same updated weights.

    Arrays are assembled with ``jax.make_array_from_callback``: on several hosts
    (``jax.distributed.initialize``), each process builds the same global meta-batch and
    places only the slices of its own devices.

    Args:
        distribution: a ``keras.distribution.DataParallel``; its first mesh axis is the user
            axis.
    """

    def __init__(self, distribution):
        mesh = distribution.device_mesh.backend_mesh
        self.axis = distribution.batch_dim_name
        self.size = int(mesh.shape[self.axis])
        self.users = NamedSharding(mesh, PartitionSpec(self.axis))
        self.replicated = NamedSharding(mesh, PartitionSpec())

    def shard_users(self, tree):
        """Every array of ``tree`` split along its leading (user) axis over the mesh."""
        return jax.tree.map(lambda x: _global_array(x, self.users), tree)

    def replicate(self, tree):
        """Every array of ``tree`` copied whole onto each device of the mesh."""
        return jax.tree.map(lambda x: _global_array(x, self.replicated), tree)


def _global_array(x, sharding):
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if x.is_fully_addressable:
            return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def user_mesh(distribution):
    """The :class:`UserMesh` of a ``keras.distribution.DataParallel``."""
    return UserMesh(distribution)


class TrainStep:
    """One jitted meta-update with ``optimizer.stateless_apply``.

    JAX cannot mutate Keras variables inside ``jax.jit``: parameters and optimizer state live
    here as arrays during ``fit`` and ``sync()`` writes them back to the variables: at each
    epoch's end, and mid-epoch only when a callback asks for the model
    (``MetaLearner.jax_state_sync``, which Keras's ``Callback.model`` calls).

    With a ``mesh`` (:class:`UserMesh`), the weights, optimizer state and non-trainable values
    are replicated on its devices and stay so after every step; the caller passes batches
    already placed by ``mesh`` (users sharded).
    """

    def __init__(self, grad_fn, optimizer, variables, non_trainable_variables, mesh=None):
        self.optimizer = optimizer
        self.variables = list(variables)
        self.non_trainable_variables = list(non_trainable_variables)
        self.mesh = mesh
        optimizer.build(self.variables)
        self._non_trainable = self._placed([v.value for v in self.non_trainable_variables])
        self.reload()

        def step(params, opt_state, non_trainable, batch):
            logs, grads = grad_fn(params, non_trainable, batch)
            params, opt_state = optimizer.stateless_apply(opt_state, grads, params)
            return logs, params, opt_state

        # No buffer donation: the arrays may also be held by the Keras variables after sync().
        if mesh is None:
            self._step = jax.jit(step)
        else:
            # Logs, weights and optimizer state come out replicated, as they went in.
            self._step = jax.jit(step, out_shardings=mesh.replicated)

    def _placed(self, values):
        return values if self.mesh is None else self.mesh.replicate(values)

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
        self._params = self._placed([v.value for v in self.variables])
        self._opt_state = self._placed([v.value for v in self.optimizer.variables])


def kernel_weights(values):
    """Variables' values for a compiled call (on JAX they already are plain arrays)."""
    return list(values)
