"""The compiled per-user programs, as module-level functions, and their cache.

Each program is a pure function of tensors that takes the learner explicitly (its ``forward``,
its inner maths ``adapt_user`` / ``map_users`` and its settings), so that a test can call it
eagerly on tiny inputs and compare it with the learner's own maths:

* :func:`adapt`: padded support batch -> adapted weights stacked ``[users, ...]``;
* :func:`score`: adapted weights, user inputs and candidate item indices -> scores
  ``[users, candidates]`` (the candidates' features are gathered in the program, from the
  encoder's item tables);
* :func:`adapt_and_score`: both in one program (one dispatch; the adapted weights stay on the
  device);
* :func:`predict`: the meta-model's own, unadapted predictions of a batch of rows.

:class:`ScoreSpec` holds what a score program reads as Python constants besides the learner's
settings: whether all users share one candidate array, whether the model takes one user row
against many item rows, and which head it returns.

:class:`KernelCache` compiles each program once per value of the settings it traces: the
learner's ``TRACED_SETTINGS`` (``inner_steps``, ``inner_lr``, ``clipnorm``, ...) and which weights
adapt. Changing ``learner.inner_lr`` after a first call therefore compiles a new program instead
of silently keeping the old value; :meth:`KernelCache.clear` (``learner.release_kernels()``)
drops them all. Programs are compiled with ``backend.jit(fn, xla=True)``: XLA on both backends,
called through concrete functions on TensorFlow (``metarec/backend/tensorflow.py``).
"""

from __future__ import annotations

import dataclasses

from keras import ops

from metarec import backend

@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """The constants of one score program.

    Attributes:
        shared: the candidate indices are one array for every user (else one row per user).
        one_row: the model takes a user's features as one row against many item rows
            (``Personalizer.user_row_broadcasts``); otherwise the row is repeated.
        head: "rating" (predicted ratings; probabilities for implicit feedback) or "ranking"
            (a two-headed model's ranking scores).
    """

    shared: bool
    one_row: bool
    head: str = "rating"

    @property
    def name(self):
        return f"shared={self.shared},one_row={self.one_row},head={self.head}"


def adaptation_negatives(learner):
    """A catalogue objective's adaptation negatives (one fixed draw, or the whole catalogue)
    as the adapt program takes them: constants of the compiled program; None otherwise."""
    objective = getattr(learner, "objective", None)
    if objective is not None and objective.inner_loss == "softmax":
        return learner.negative_inputs(objective.sampler.inference_draw())
    return None


def adapt(learner, params, non_trainable, inputs, target, mask, negatives=None):
    """Adapted weights of a padded batch of users, stacked ``[users, ...]``.

    ``params``, ``non_trainable``: the learner's meta parameters and the model's non-trainable
    values (``learner.snapshot()``); ``inputs`` (model inputs ``[users, S, ...]``), ``target``
    and ``mask`` (``[users, S]``): the support batch. Each user's weights are
    ``learner.adapt_user`` of their rows, vectorised by ``learner.map_users``.
    """
    if learner.inner_steps == 0 and not learner.reads_support:
        # Nothing to adapt: every user gets the initialisation. (Mapping a function that
        # ignores its mapped inputs fails under tf.vectorized_map.)
        adapted, _ = learner.initial_weights(params)
        users = ops.shape(target)[0]
        return [ops.broadcast_to(w[None], (users,) + tuple(w.shape)) for w in adapted]

    def one(params, non_trainable, context, inputs, target, mask):
        adapted, _ = learner.adapt_user(params, non_trainable, inputs, target, mask,
                                        context=context, negatives=negatives)
        return adapted

    return learner.map_users(one, params, non_trainable, inputs, target, mask)


def score(learner, spec, params, non_trainable, adapted, users, item_index, tables):
    """Scores ``[users, candidates]`` of candidates by adapted users.

    ``adapted``: stacked adapted weights ``[users, ...]``; ``users``: stacked user inputs
    ``{name: [users, ...]}``; ``item_index``: candidate item indices, one array for every user
    when ``spec.shared``, else ``[users, candidates]``; ``tables``: the encoder's item feature
    tables (``{name: [num_items, ...]}``), from which the candidates' features are gathered.
    """
    model_params, _ = learner.split_meta(params)
    _, fixed = learner.forward.split(model_params)
    items = {"item_id": item_index}
    items.update({k: ops.take(t, item_index, axis=0) for k, t in tables.items()})
    explicit = learner.feedback == "explicit"

    def one(adapted, user, items):
        inputs = dict(items)
        if spec.one_row:
            inputs.update({k: ops.expand_dims(v, 0) for k, v in user.items()})
        else:
            n = ops.shape(items["item_id"])[0]
            inputs.update({k: ops.broadcast_to(ops.expand_dims(v, 0), (n,) + tuple(v.shape))
                           for k, v in user.items()})
        rating, ranking = learner.forward.heads(adapted, fixed, non_trainable, inputs)
        if spec.head == "ranking":
            return ranking
        return rating if explicit else ops.sigmoid(rating)

    return backend.vmap(one, (0, 0, None if spec.shared else 0))(adapted, users, items)


def adapt_and_score(learner, spec, params, non_trainable, inputs, target, mask, users,
                    item_index, tables, negatives=None):
    """:func:`adapt` then :func:`score` in one program: ``(adapted, scores)``."""
    adapted = adapt(learner, params, non_trainable, inputs, target, mask, negatives)
    return adapted, score(learner, spec, params, non_trainable, adapted, users, item_index, tables)


def predict(learner, params, non_trainable, inputs):
    """The meta-model's own predictions ``[n]`` of a batch of rows (``inputs``: model inputs),
    as ratings, or probabilities for implicit feedback."""
    model_params, _ = learner.split_meta(params)
    adapted, fixed = learner.forward.split(model_params)
    out = learner.forward(adapted, fixed, non_trainable, inputs)
    return out if learner.feedback == "explicit" else ops.sigmoid(out)


def traced_settings(learner):
    """The values of the settings a learner's programs read as constants while tracing: its
    ``TRACED_SETTINGS`` and the positions of the weights that adapt."""
    settings = tuple(getattr(learner, attr, None) for attr in learner.TRACED_SETTINGS)
    return settings, tuple(learner.forward.adapt_index)


class KernelCache:
    """A learner's compiled programs, keyed on their name and :func:`traced_settings`."""

    def __init__(self):
        self._programs = {}

    def key(self, learner, name):
        return (name,) + traced_settings(learner)

    def get(self, learner, name, build):
        """The compiled ``build()`` for the learner's current settings (built on first use)."""
        key = self.key(learner, name)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = backend.jit(build(), xla=True)
        return program

    def clear(self):
        self._programs.clear()

    def __len__(self):
        return len(self._programs)

    # The per-user programs, compiled. (Closures rather than functools.partial: the bound
    # learner and negatives must stay constants of the program, never inputs of it.)
    def adapt(self, learner):
        def build():
            negatives = adaptation_negatives(learner)

            def program(params, non_trainable, inputs, target, mask):
                return adapt(learner, params, non_trainable, inputs, target, mask, negatives)

            return program

        return self.get(learner, "adapt", build)

    def score(self, learner, spec):
        def build():
            def program(params, non_trainable, adapted, users, item_index, tables):
                return score(learner, spec, params, non_trainable, adapted, users, item_index, tables)

            return program

        return self.get(learner, "score:" + spec.name, build)

    def adapt_and_score(self, learner, spec):
        def build():
            negatives = adaptation_negatives(learner)

            def program(params, non_trainable, inputs, target, mask, users, item_index, tables):
                return adapt_and_score(learner, spec, params, non_trainable, inputs, target, mask,
                                       users, item_index, tables, negatives)

            return program

        return self.get(learner, "adapt_and_score:" + spec.name, build)

    def predict(self, learner):
        def build():
            def program(params, non_trainable, inputs):
                return predict(learner, params, non_trainable, inputs)

            return program

        return self.get(learner, "predict", build)
