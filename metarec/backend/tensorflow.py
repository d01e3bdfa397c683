"""TensorFlow implementations of the backend primitives (see ``metarec.backend``)."""

import numpy as np
import tensorflow as tf

try:
    # What tf.convert_to_tensor ends in for a numpy array, without its dispatch: about half its
    # time per array (bench/kernel_floor.py), and a serving kernel takes about a dozen arrays.
    from tensorflow.python.eager import context as _eager_context
    from tensorflow.python.framework.constant_op import convert_to_eager_tensor as _to_eager
except ImportError:  # pragma: no cover - a TensorFlow without these private modules
    _to_eager = None


def _dense(grad, like):
    # Embedding gradients arrive as IndexedSlices; `w - lr * g` needs a dense tensor.
    if grad is None:
        return tf.zeros_like(like)
    if isinstance(grad, tf.IndexedSlices):
        return tf.convert_to_tensor(grad)
    return grad


def value_and_grad(fn, has_aux=False):
    """Value and gradient of ``fn(params, *args)`` with respect to the list ``params``.

    Called inside an outer ``GradientTape`` (the MAML meta-step), the inner tape's gradient
    computation is itself recorded, which is what makes second-order meta-gradients exact.
    """

    def wrapped(params, *args):
        params = list(params)
        with tf.GradientTape() as tape:
            tape.watch(params)
            out = fn(params, *args)
            value = out[0] if has_aux else out
        grads = tape.gradient(value, params)
        grads = [_dense(g, p) for g, p in zip(grads, params)]
        return out, grads

    return wrapped


def vmap(fn, in_axes):
    """Vectorise ``fn`` over axis 0 of the arguments marked 0 in ``in_axes``."""
    in_axes = tuple(in_axes)

    def wrapped(*args):
        if len(args) != len(in_axes):
            raise ValueError(f"vmap expected {len(in_axes)} arguments, got {len(args)}.")
        mapped = tuple(a for a, ax in zip(args, in_axes) if ax == 0)

        def per_element(elems):
            it = iter(elems)
            full = [next(it) if ax == 0 else a for a, ax in zip(args, in_axes)]
            return fn(*full)

        return tf.vectorized_map(per_element, mapped, fallback_to_while_loop=True)

    return wrapped


def jit(fn, xla=False):
    """Compile with ``tf.function``; shapes come from a few buckets, so retracing is rare.

    The default (``xla=False``, the same on both backends) is a plain graph. ``xla=True`` also compiles the graph with XLA (``jit_compile``): measured faster for the
    adaptation and scoring kernels (many small ops, one fused program), not for everything.
    """
    if xla:
        return _ConcreteCall(tf.function(fn, jit_compile=True))
    return tf.function(fn, reduce_retracing=True)


class _ConcreteCall:
    """A compiled ``tf.function`` called through its concrete functions directly.

    A ``tf.function`` call spends about 2 ms of Python on this CPU binding, type-checking and
    converting ~20 arguments before the ~1 ms program runs (the serving kernels are called
    once per request). The concrete function of each input signature (the flat inputs'
    kinds, shapes and dtypes, and the nesting) is looked up in a dict instead, and called
    with the flat inputs: arrays as tensors, ``tf.Variable`` s as their resource handles (the
    program reads them when it runs, with no eager read per variable). Each signature is
    traced once, as ``tf.function`` would; the XLA program compiles per shape either way.
    """

    def __init__(self, function):
        self.function = function
        self._concrete = {}

    def __call__(self, *args):
        leaves = tf.nest.flatten(args)
        key = (_nesting(args), tuple(_signature(x) for x in leaves))
        tensors = [x if isinstance(x, (tf.Variable, tf.Tensor)) else _tensor(x) for x in leaves]
        concrete = self._concrete.get(key)
        if concrete is None:
            concrete = self.function.get_concrete_function(*tf.nest.pack_sequence_as(args, tensors))
            self._concrete[key] = concrete
        # ``_call_flat`` is ConcreteFunction's own flat entry point (private); where a
        # TensorFlow version lacks it, the public call gives the same results, slower.
        call_flat = getattr(concrete, "_call_flat", None)
        if call_flat is None:
            return concrete(*tf.nest.pack_sequence_as(args, tensors))
        return call_flat([x.handle if isinstance(x, tf.Variable) else x for x in tensors],
                         concrete.captured_inputs)


def _tensor(x):
    """An eager tensor of an argument: numpy arrays through the direct eager conversion when
    running eagerly (as kernel calls do), anything else through ``tf.convert_to_tensor``."""
    if _to_eager is not None and isinstance(x, np.ndarray) and tf.executing_eagerly():
        try:
            return _to_eager(x, _eager_context.context())
        except Exception:  # noqa: BLE001 - whatever it refuses takes the public path below,
            pass  # which converts it or raises its own error
    return tf.convert_to_tensor(x)


def _signature(x):
    """What selects a concrete function: the leaf's kind, shape and dtype (numpy shapes are
    read without building a ``TensorShape``)."""
    if isinstance(x, tf.Variable):
        return ("variable", tuple(x.shape), x.dtype)
    if isinstance(x, tf.Tensor):
        return ("tensor", tuple(x.shape), x.dtype)
    x = np.asarray(x)
    return ("array", x.shape, x.dtype)


def _nesting(x):
    """A hashable description of a nest of lists, tuples and dicts (not of its leaves)."""
    if isinstance(x, dict):
        return ("d",) + tuple((k, _nesting(v)) for k, v in sorted(x.items()))
    if isinstance(x, (list, tuple)):
        return ("l", len(x)) + tuple(_nesting(v) for v in x)
    return None


def enable_compilation_cache(path):
    """TensorFlow keeps no compiled programs across processes here (its XLA cache is set by
    ``TF_XLA_FLAGS`` before TensorFlow starts, and tracing, most of the cost, is redone
    anyway): nothing is changed. Returns False so that callers can say so."""
    return False


def to_numpy(x):
    return np.asarray(x)


def kernel_weights(values):
    """Variables' values as the compiled kernels take them: the ``tf.Variable`` s themselves.

    A kernel called through :class:`_ConcreteCall` gets their handles and reads them when it
    runs; an eager read per variable cost about 50 us each, per call. (A plain
    ``tf.function`` accepts variables too.)
    """
    return list(values)


def user_mesh(distribution):
    """Multi-device meta-training is JAX-only: a ``ValueError`` naming the fix.

    The meta-step (``tf.vectorized_map`` over users of nested gradient tapes, then the Keras
    optimizer, in one ``tf.function``) is not written for ``tf.distribute``'s per-replica
    calls and cross-replica reductions, and Keras 3's ``keras.distribution`` has no
    TensorFlow implementation."""
    raise ValueError(
        "Data-parallel meta-training over a device mesh needs the JAX backend: run with "
        f"KERAS_BACKEND=jax (or train without a distribution); got distribution={distribution!r} "
        "on the TensorFlow backend."
    )


class TrainStep:
    """One compiled meta-update: ``loss, grads = grad_fn(params, batch)``, then the optimizer.

    On TensorFlow the optimizer updates the Keras variables in place inside the ``tf.function``,
    as Keras's own TensorFlow trainer does. (``mesh`` is always None here: see ``user_mesh``.)
    """

    def __init__(self, grad_fn, optimizer, variables, non_trainable_variables, mesh=None):
        self.optimizer = optimizer
        self.variables = list(variables)
        self.non_trainable_variables = list(non_trainable_variables)
        optimizer.build(self.variables)

        def step(batch):
            params = [tf.convert_to_tensor(v.value) for v in self.variables]
            non_trainable = [tf.convert_to_tensor(v.value) for v in self.non_trainable_variables]
            logs, grads = grad_fn(params, non_trainable, batch)
            self.optimizer.apply(grads, self.variables)
            return logs

        # No XLA here: measured 100x slower for second-order MAML (vectorized_map of nested
        # tapes), and no faster for first-order MAML and Reptile.
        self._step = tf.function(step, reduce_retracing=True)

    def __call__(self, batch):
        return self._step(batch)

    def sync(self):
        """Variables are updated in place; nothing to write back."""

    def reload(self):
        """Variables are read at every step; nothing to re-read."""
