"""``MetaLearner``: the Keras-native base of every meta-learner.

A meta-learner is a ``keras.Model`` that wraps the user's model. ``compile`` takes any Keras
optimizer (the outer loop), ``fit`` meta-trains over a ``TaskSet`` with callbacks and a progress
bar, ``save`` writes one ``.keras`` file holding the model, every metarec setting and the
feature encoder. The learner holds the meta-training side: settings, the inner maths
(``adapt_user``, vectorised by ``map_users``), the outer loop, evaluation and saving.

Per-user calls (adapt, score, recommend) belong to ``learner.runtime``, a
:class:`metarec.runtime.Personalizer`; the learner's ``adapt``, ``adapt_many``, ``score_many``,
``recommend_many`` ... are one-line calls of it.

Subclasses implement ``meta_gradients`` (the outer-loop gradient of one meta-batch) and may
override ``support_contexts`` and ``initial_weights`` (what a memory-based learner reads from the
support set, and how it conditions a user's starting weights) and ``TRACED_SETTINGS``.

**Keras attribute tracking.** Keras (and, on TensorFlow, ``tf.Module``) tracks what is assigned
to a layer's attributes, wrapping lists and dicts. An attribute that holds no weights (caches,
position lists, the runtime, the objective, a sub-model whose weights are tracked elsewhere) is
set with :func:`untracked`, the one way metarec keeps plain Python state on a Keras object.
"""

import json
import os
import re

import keras
import numpy as np
from keras import ops

from metarec import backend
from metarec.catalogue_objective import CatalogueObjective
from metarec.data_parallel import user_mesh_for
from metarec.inner_loop import Forward, inner_loop, masked_loss, real_users
from metarec.progress import resolve_verbose
from metarec.runtime import EncodedCandidates, EncodedSupports, FlatSupports, Personalizer
from metarec.runtime.requests import frame_list, require_encoder
from metarec.sampling import item_counts_of
from metarec.tasks import Episode

ADAPT_CHOICES = ("all", "decision_layers")
LEARN_LR_CHOICES = (None, "per_layer", "per_parameter")


def untracked(obj, name, value):
    """Set ``obj.name = value`` outside Keras's (and TensorFlow's) attribute tracking.

    The one way metarec keeps plain Python state on a Keras layer or model: lists and dicts
    assigned normally are wrapped and tracked, and a Keras model assigned normally has its
    weights counted as the owner's. Read the attribute back normally."""
    object.__setattr__(obj, name, value)


def positions_in(pool, variables):
    """Positions of ``variables`` in the list ``pool``, matched by identity (None for a
    variable that is not in it)."""
    where = {id(v): i for i, v in enumerate(pool)}
    return [where.get(id(v)) for v in variables]


def resolve_adapt(model, adapt):
    """Positions in ``model.trainable_variables`` of the weights that adapt per user.

    ``adapt`` is "all", "decision_layers" (layers named ``decision*``, or else the trailing run
    of Dense layers: the MeLU split), a callable on variable paths, or a list of path regexes.
    """
    variables = model.trainable_variables
    paths = [v.path for v in variables]
    if isinstance(adapt, str):
        if adapt == "all":
            index = list(range(len(paths)))
        elif adapt == "decision_layers":
            index = [i for i, p in enumerate(paths) if re.search(r"(^|/)decision", p)]
            if not index:
                index = _trailing_dense_index(model)
        else:
            raise ValueError(
                f"adapt must be one of {ADAPT_CHOICES}, a callable or a list of variable-path "
                f"patterns; got adapt={adapt!r}."
            )
    elif callable(adapt):
        index = [i for i, p in enumerate(paths) if adapt(p)]
    elif isinstance(adapt, (list, tuple)):
        patterns = []
        for pat in adapt:
            # Strings only: they are what the .keras file stores.
            if not isinstance(pat, str):
                raise ValueError(
                    f"adapt as a list holds variable-path regexes (strings); got {pat!r} "
                    f"in adapt={adapt!r}."
                )
            try:
                patterns.append(re.compile(pat))
            except re.error as exc:
                raise ValueError(f"adapt holds an invalid regex {pat!r} ({exc}); got adapt={adapt!r}.") from exc
        index = [i for i, p in enumerate(paths) if any(pat.search(p) for pat in patterns)]
    else:
        raise ValueError(f"adapt must be a string, a callable or a list; got adapt={adapt!r}.")
    if not index:
        raise ValueError(
            f"adapt={adapt!r} selects no trainable weight of the model; its weights are {paths}."
        )
    return index


def _check_task_set(tasks, what):
    """``TypeError`` unless ``tasks`` is a task set (``TaskSet``, ``ArrayTasks``): a DataFrame,
    ``InteractionData`` or ``UserTasks`` passed by mistake would fail later with an
    ``AttributeError`` that says nothing of what to pass."""
    if hasattr(tasks, "episodes") and hasattr(tasks, "num_batches") and hasattr(tasks, "encoder"):
        return
    got = type(tasks).__name__
    if hasattr(tasks, "train") and hasattr(tasks, "test"):
        hint = "pass one of its splits, e.g. tasks.train (and validation_data=tasks.val)"
    else:
        hint = ("build one from your interactions: tasks = metarec.UserTasks(metarec.InteractionData(frame), "
                "support_size=10), then pass tasks.train")
    raise TypeError(f"{what} must be a TaskSet of users (one support and query set each); got a {got}: {hint}.")


def _check_not_empty(tasks, what):
    """``ValueError`` for a task set with no users: training on it would do nothing, and a
    loss over no users would read as 0.0, a perfect score."""
    _check_task_set(tasks, what)
    size = len(tasks)
    if size == 0:
        raise ValueError(
            f"{what} is empty: it must hold at least one user; got {tasks!r} of size {size}."
        )


def _trailing_dense_index(model):
    layers = [layer for layer in model.layers if layer.trainable_weights]
    trailing = []
    for layer in reversed(layers):
        if not isinstance(layer, keras.layers.Dense):
            break
        trailing.append(layer)
    ids = {id(v) for layer in trailing for v in layer.trainable_weights}
    return [i for i, v in enumerate(model.trainable_variables) if id(v) in ids]


class InnerLearningRates(keras.layers.Layer):
    """The meta-learned inner learning rates: one variable per adapted weight."""

    def __init__(self, shapes, initial, **kwargs):
        super().__init__(**kwargs)
        self.rates = [
            self.add_weight(shape=shape, initializer=keras.initializers.Constant(initial),
                            name=f"inner_lr_{i}")
            for i, shape in enumerate(shapes)
        ]
        self.built = True


class MetaLearner(keras.Model):
    """Base class: settings, the training loop, evaluation and saving.

    Args:
        model: a Keras 3 model over the feature dict (see ``metarec.models``); it must be built.
        inner_steps: gradient steps on a user's support set, in training and at adaptation.
        inner_lr: the inner learning rate (the initial value when it is learned).
        adapt: which weights adapt per user: "all", "decision_layers", a callable on variable
            paths, or a list of path regexes. The others change only in the outer loop.
        clipnorm: global-norm clip of each inner gradient (None to disable).
        proximal: strength of a pull toward the initialisation in the inner loss,
            ``proximal / 2 * ||w - w0||^2`` (0 to disable): lets more inner steps help
            rather than overfit a user's few interactions.
        learn_inner_lr: None, "per_layer" or "per_parameter" (Meta-SGD): meta-learn the inner
            learning rates jointly with the initialisation.
        feedback: "explicit" or "implicit"; taken from the training tasks when None.
        encoder: the ``FeatureEncoder`` that turns raw ids into inputs; taken from the training
            tasks when None. Saved with the model.
        objective: None (the rating loss: squared error for explicit feedback, log loss for
            implicit) or a :class:`metarec.catalogue_objective.CatalogueObjective`: each
            positive item against catalogue negatives (plus a rating term), in both loops.
            Needed for positives-only implicit data.
    """

    #: Whether ``support_contexts`` reads the support set (the memory-based learner).
    reads_support = False

    #: Settings that ``adapt_user`` and the scoring kernels read as Python constants (traced
    #: into the compiled programs): ``metarec.runtime.kernels.KernelCache`` is keyed on them. (MAML's
    #: ``ranking_weight`` is read only by ``meta_gradients``, whose step ``fit`` compiles anew.)
    TRACED_SETTINGS = ("inner_steps", "inner_lr", "clipnorm", "proximal", "first_order",
                       "learn_inner_lr", "feedback", "objective")

    def __init__(
        self,
        model,
        inner_steps=5,
        inner_lr=0.01,
        adapt="decision_layers",
        clipnorm=5.0,
        learn_inner_lr=None,
        feedback=None,
        encoder=None,
        proximal=0.0,
        objective=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model) or not model.built:
            raise ValueError(f"model must be a built keras.Model; got model={model!r}.")
        if not isinstance(inner_steps, (int, np.integer)) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an integer >= 0; got {inner_steps!r}.")
        if not np.isfinite(inner_lr) or inner_lr < 0:
            raise ValueError(f"inner_lr must be a finite number >= 0; got {inner_lr!r}.")
        if clipnorm is not None and not clipnorm > 0:
            raise ValueError(f"clipnorm must be > 0 or None; got {clipnorm!r}.")
        if not np.isfinite(proximal) or proximal < 0:
            raise ValueError(f"proximal must be a finite number >= 0; got {proximal!r}.")
        if learn_inner_lr not in LEARN_LR_CHOICES:
            raise ValueError(f"learn_inner_lr must be one of {LEARN_LR_CHOICES}; got {learn_inner_lr!r}.")
        if feedback not in (None, "explicit", "implicit"):
            raise ValueError(f"feedback must be 'explicit' or 'implicit'; got {feedback!r}.")
        self.model = model
        self.inner_steps = int(inner_steps)
        self.inner_lr = float(inner_lr)
        # Stored under another name: `adapt` is the method that adapts to a user.
        self.adapt_spec = adapt
        self.clipnorm = None if clipnorm is None else float(clipnorm)
        self.proximal = float(proximal)
        self.learn_inner_lr = learn_inner_lr
        if objective is not None and not isinstance(objective, CatalogueObjective):
            raise ValueError("objective must be None or a metarec.catalogue_objective.CatalogueObjective; "
                             f"got {type(objective).__name__} {objective!r:.100}.")
        self.feedback = feedback
        self.encoder = encoder
        untracked(self, "objective", objective)  # it holds no weights
        untracked(self, "runtime", Personalizer(self))  # the per-user calls
        self.forward = Forward(model, resolve_adapt(model, adapt))
        self.inner_lr_weights = self._make_inner_lr_weights()
        self.built = True

    # ------------------------------------------------------------------ weights
    def _make_inner_lr_weights(self):
        if self.learn_inner_lr is None:
            return []
        adapted = [self.model.trainable_variables[i] for i in self.forward.adapt_index]
        shapes = [() if self.learn_inner_lr == "per_layer" else tuple(v.shape) for v in adapted]
        # A sub-layer created after `self.model`, so that Keras orders the learner's trainable
        # variables as model weights, then rates: the order the optimizer state is saved in.
        self.inner_lr_layer = InnerLearningRates(shapes, self.inner_lr)
        return self.inner_lr_layer.rates

    @property
    def meta_variables(self):
        """Everything the outer loop updates (model weights and learned rates), in Keras's own
        ``trainable_variables`` order: the order in which optimizer state is saved and loaded."""
        return list(self.trainable_variables)

    def _meta_positions(self):
        if getattr(self, "_positions", None) is None:
            meta = self.meta_variables
            untracked(self, "_positions", (positions_in(meta, self.model.trainable_variables),
                                           positions_in(meta, self.inner_lr_weights)))
        return self._positions

    def split_meta(self, params):
        """Meta parameters -> (model weights in model order, learned rates)."""
        model_pos, lr_pos = self._meta_positions()
        return [params[i] for i in model_pos], [params[i] for i in lr_pos]

    def merge_meta(self, model_values, lr_values):
        """Inverse of ``split_meta`` (e.g. to assemble gradients)."""
        model_pos, lr_pos = self._meta_positions()
        out = [None] * (len(model_pos) + len(lr_pos))
        for i, v in zip(model_pos, model_values):
            out[i] = v
        for i, v in zip(lr_pos, lr_values):
            out[i] = v
        return out

    def _learning_rates(self, lr_params, dtype="float32"):
        if self.learn_inner_lr is None:
            rate = ops.convert_to_tensor(self.inner_lr, dtype=dtype)
            return [rate] * len(self.forward.adapt_index)
        return list(lr_params)

    def snapshot(self):
        """Current weight values as tensors: (meta params, non-trainable values)."""
        params = [v.value for v in self.meta_variables]
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        return params, non_trainable

    # ------------------------------------------------------------------ maths
    def support_contexts(self, params, non_trainable, inputs, target, mask):
        """What a learner reads from whole support batches ``[B, S]`` before the per-user,
        vectorised adaptation (one entry per user along axis 0), or None.

        Gradient-based learners read nothing; the memory-based learner runs its recurrent
        reader here, batched over users, rather than once per user inside the vectorised map.
        """
        return None

    def initial_weights(self, params, context=None):
        """One user's starting point: (adapted weights, fixed weights). The meta-learned
        initialisation; the memory-based learner conditions it on the user's ``context``."""
        model_params, _ = self.split_meta(params)
        return self.forward.split(model_params)

    def user_loss(self, adapted, fixed, non_trainable, inputs, target, mask, negatives=None,
                  inner=False):
        """One user's loss on their rows: the rating loss, or the catalogue objective's (which
        needs ``negatives``, see ``metarec.catalogue_objective``; ``inner`` selects its inner
        loop's form)."""
        if self.objective is None:
            return masked_loss(self.forward(adapted, fixed, non_trainable, inputs), target, mask,
                               self.feedback)
        return self.objective.user_loss(self.forward, adapted, fixed, non_trainable, inputs, target,
                                        mask, negatives, self.feedback, inner=inner)

    def adapt_user(self, params, non_trainable, inputs, target, mask, steps=None, context=None,
                   negatives=None):
        """Adapted weights of one user from their support set (pure; used everywhere)."""
        _, lr_params = self.split_meta(params)
        adapted, fixed = self.initial_weights(params, context)
        user_loss = None
        if self.objective is not None:
            def user_loss(weights):
                return self.user_loss(weights, fixed, non_trainable, inputs, target, mask, negatives,
                                      inner=True)

        adapted = inner_loop(
            self.forward,
            adapted,
            fixed,
            non_trainable,
            inputs,
            target,
            mask,
            steps=self.inner_steps if steps is None else steps,
            learning_rates=self._learning_rates(lr_params, adapted[0].dtype),
            clipnorm=self.clipnorm,
            first_order=getattr(self, "first_order", False),
            feedback=self.feedback,
            proximal=self.proximal,
            user_loss=user_loss,
        )
        return adapted, fixed

    def user_query_losses(self, params, non_trainable, episode, steps=None, with_before=True,
                          negatives=None):
        """Per-user query loss after (and, with ``with_before``, before) adaptation to the
        support set, vectorised over the meta-batch. ``negatives`` (shared by the batch's
        users) are those of a catalogue objective."""

        def one_user(params, non_trainable, context, s_x, s_y, s_m, q_x, q_y, q_m):
            adapted, fixed = self.adapt_user(params, non_trainable, s_x, s_y, s_m, steps, context,
                                             negatives)
            after = self.user_loss(adapted, fixed, non_trainable, q_x, q_y, q_m, negatives)
            if not with_before:
                return after
            model_params, _ = self.split_meta(params)
            adapted0, fixed = self.forward.split(model_params)
            before = self.user_loss(adapted0, fixed, non_trainable, q_x, q_y, q_m, negatives)
            return before, after

        return self.map_users(one_user, params, non_trainable, *episode)

    def map_users(self, fn, params, non_trainable, inputs, target, mask, *rest):
        """``fn(params, non_trainable, context, inputs, target, mask, *rest)`` vectorised over
        the users of a batch, with ``context`` from ``support_contexts`` (None when there is
        none: then it is passed as a constant rather than mapped)."""
        context = self.support_contexts(params, non_trainable, inputs, target, mask)
        per_user = (inputs, target, mask) + tuple(rest)
        if context is None:
            mapped = backend.vmap(
                lambda p, n, *u: fn(p, n, None, *u), (None, None) + (0,) * len(per_user)
            )
            return mapped(params, non_trainable, *per_user)
        mapped = backend.vmap(fn, (None, None, 0) + (0,) * len(per_user))
        return mapped(params, non_trainable, context, *per_user)

    def meta_gradients(self, params, non_trainable, episode):
        """Outer-loop ``(logs, grads)`` for one meta-batch; implemented by each meta-learner."""
        raise NotImplementedError

    # ------------------------------------------------------------------ keras API
    def call(self, inputs, training=False):
        """The meta-model's own (non-adapted) predictions."""
        return self.model(inputs, training=training)

    def prepare(self, tasks) -> None:
        """Binds the learner to a task set before meta-training (``fit`` calls it): takes the
        feedback kind and encoder from ``tasks`` when unset, refuses positives-only implicit data
        without a catalogue objective, and fits the negative sampler's item counts.

        Args:
            tasks: the training :class:`metarec.UserTasks` (or any task set with ``encoder``).
        """
        if getattr(self, "optimizer", None) is None:
            raise ValueError("Call compile(optimizer=...) before fit().")
        if self.feedback is None:
            self.feedback = tasks.encoder.schema.feedback
        if self.encoder is None:
            self.encoder = tasks.encoder
        if self.objective is None and self.feedback == "implicit":
            labels = np.asarray(tasks.frame()["rating"])
            if len(labels) and np.all(labels == 1):
                raise ValueError(
                    f"The training set holds positives only (all {len(labels)} labels are 1): a log "
                    "loss would learn to score every item 1. Pass objective=CatalogueObjective("
                    "NegativeSampler(...)) (metarec.catalogue_objective, metarec.sampling) so that "
                    "each positive is scored against catalogue negatives, or add 0-labelled rows."
                )
        if self.objective is not None and self.objective.sampler.item_counts is None:
            self.objective.sampler.fit(item_counts_of(tasks))

    @staticmethod
    def split_batch(batch):
        """A compiled step's input -> (episode, negatives or None)."""
        if isinstance(batch, Episode):
            return batch, None
        return batch

    def negative_inputs(self, negatives):
        """:class:`metarec.sampling.Negatives` as the compiled functions take them."""
        return {"inputs": self._require_encoder().item_inputs(negatives.index),
                "index": negatives.index, "correction": negatives.correction,
                "mask": negatives.mask}

    def train_batch(self, episode, step):
        """What the train step takes: the episode, with this step's negatives when the
        objective is catalogue-aware."""
        if self.objective is None:
            return episode
        items = None
        if self.objective.sampler.kind == "in_batch":
            items = np.concatenate([
                (episode.support["item_id"] * (episode.support_mask > 0)).reshape(-1),
                (episode.query["item_id"] * (episode.query_mask > 0)).reshape(-1),
            ])
        return episode, self.negative_inputs(self.objective.sampler.draw(step, items))

    def placed_batch(self, batch, mesh):
        """A train batch on the devices of ``mesh`` (a ``backend.user_mesh``; None: the batch as
        it is): the episode's users split over the devices, a catalogue objective's negatives
        (shared by all users) replicated.

        Args:
            batch: what ``train_batch`` returns.
            mesh: the user mesh of a data-parallel ``fit``, or None.

        Returns:
            The batch, placed.
        """
        if mesh is None:
            return batch
        episode, negatives = self.split_batch(batch)
        if negatives is None:
            return mesh.shard_users(episode)
        return mesh.shard_users(episode), mesh.replicate(negatives)

    def eval_batch(self, episode):
        """What the test step takes: the episode, with the fixed inference negatives when the
        objective is catalogue-aware."""
        if self.objective is None:
            return episode
        return episode, self.negative_inputs(self.objective.sampler.inference_draw())

    def fit(
        self,
        x,
        validation_data=None,
        epochs=1,
        batch_size=32,
        callbacks=None,
        verbose="auto",
        shuffle=True,
        seed=None,
        max_query=128,
        initial_epoch=0,
        validation_freq=1,
        distribution=None,
    ):
        """Meta-train over the users of the ``TaskSet`` ``x``; returns a ``History``.

        One step is one meta-batch of ``batch_size`` users. ``validation_data`` (a ``TaskSet``)
        is scored after each epoch as ``val_loss``: the query loss after adapting to each
        validation user's support set, which is what callbacks such as EarlyStopping watch.

        ``distribution``: a ``keras.distribution.DataParallel`` to meta-train data-parallel
        over its devices (JAX backend): each meta-batch's users are split over the devices,
        the weights replicated, the meta-gradient averaged across devices. None (default):
        Keras's global distribution (``keras.distribution.set_distribution``), if one is set.
        ``batch_size`` must then be a multiple of the number of devices. See
        ``metarec.data_parallel``.
        """
        _check_task_set(x, "the training set x")
        self.prepare(x)
        _check_not_empty(x, "the training set x")
        if validation_data is not None:
            _check_not_empty(validation_data, "validation_data")
        mesh = user_mesh_for(distribution, batch_size)
        verbose = resolve_verbose(verbose)  # piped output: one line per epoch, no bar frames
        steps = x.num_batches(batch_size)
        train_step = backend.TrainStep(
            self.meta_gradients, self.optimizer, self.meta_variables,
            self.model.non_trainable_variables, mesh=mesh,
        )
        if not isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks = keras.callbacks.CallbackList(
                callbacks, add_history=True, add_progbar=verbose != 0, model=self,
                verbose=verbose, epochs=epochs, steps=steps,
            )
        self.stop_training = False
        global_step = initial_epoch * steps
        # While fit runs, a callback that reads ``callback.model`` on JAX has the train step's
        # current state written back to the variables first (``jax_state_sync``), as Keras's
        # own JAX trainer does; with no such callback, weights are written once per epoch.
        untracked(self, "_fit_state", {"step": train_step, "synced": True})
        try:
            callbacks.on_train_begin()
            base_seed = 0 if seed is None else int(seed)
            logs = {}
            for epoch in range(initial_epoch, epochs):
                callbacks.on_epoch_begin(epoch)
                totals = {}
                batches = x.episodes(
                    batch_size, shuffle=shuffle, seed=base_seed + epoch, max_query=max_query,
                    resample=True,
                )
                for step, episode in enumerate(batches):
                    callbacks.on_train_batch_begin(step)
                    self._before_train_step()
                    step_logs = train_step(self.placed_batch(self.train_batch(episode, global_step),
                                                             mesh))
                    global_step += 1
                    self._fit_state["synced"] = False
                    for k, v in step_logs.items():
                        totals[k] = totals.get(k, 0.0) + float(backend.to_numpy(v))
                    logs = {k: v / (step + 1) for k, v in totals.items()}
                    callbacks.on_train_batch_end(step, logs)
                    if self.stop_training:
                        break
                self.jax_state_sync()
                if validation_data is not None and (epoch + 1) % validation_freq == 0:
                    val = self.evaluate(validation_data, batch_size=batch_size, verbose=0)
                    logs.update({f"val_{k}": v for k, v in val.items()})
                callbacks.on_epoch_end(epoch, logs)
                train_step.reload()  # callbacks may have changed the weights
                if self.stop_training:
                    break
            callbacks.on_train_end(logs)
        finally:
            self.jax_state_sync()
            untracked(self, "_fit_state", None)
        return self.history

    def _before_train_step(self):
        """Re-read the variables into the train step where a callback had them written back
        since the last step (it may also have changed them, e.g. restored a checkpoint)."""
        state = self._fit_state
        if state["synced"]:
            state["step"].reload()

    def jax_state_sync(self):
        """Write the state of a running ``fit`` back to the Keras variables.

        On JAX, ``fit`` keeps the weights and optimizer state as arrays between steps; Keras's
        ``Callback.model`` calls this before handing the model to a callback, so a batch-level
        callback (a ``ModelCheckpoint`` with ``save_freq``, anything reading the weights in
        ``on_train_batch_end``) sees the current weights. A no-op when nothing is pending (and
        on TensorFlow, whose train step updates the variables in place).
        """
        state = getattr(self, "_fit_state", None)
        if state is not None and not state["synced"]:
            state["step"].sync()
            state["synced"] = True
        parent = getattr(super(), "jax_state_sync", None)
        if parent is not None:
            parent()

    def evaluate(self, x, batch_size=32, verbose="auto", steps=None):
        """Mean query loss over the users of ``x`` after (``loss``) and before (``loss_before``)
        adaptation to their support sets. Returns a dict."""
        _check_not_empty(x, "the evaluation set x")
        if self.feedback is None:
            self.feedback = x.encoder.schema.feedback
        verbose = resolve_verbose(verbose)
        fn = self._jit_eval()
        params, non_trainable = self.snapshot()
        sums = np.zeros(2)
        users = 0.0
        progbar = keras.utils.Progbar(x.num_batches(batch_size), verbose=verbose) if verbose else None
        for i, episode in enumerate(x.episodes(batch_size, shuffle=False)):
            outputs = fn(params, non_trainable, self.eval_batch(episode))
            before, after, weight = (backend.to_numpy(t) for t in outputs)
            sums += [float((before * weight).sum()), float((after * weight).sum())]
            users += float(weight.sum())
            if progbar:
                progbar.update(i + 1)
        if users == 0:
            # Every user's query set is empty: there is no loss to report, and 0.0 would read
            # as a perfect score (to EarlyStopping, say).
            raise ValueError(
                f"The evaluation set x has no query interactions: none of its {len(x)} users "
                "has an interaction beyond the support set."
            )
        return {"loss": sums[1] / users, "loss_before": sums[0] / users}

    # ------------------------------------------------------------------ compiled functions
    def _jit_eval(self):
        def build():
            def eval_fn(params, non_trainable, batch):
                episode, negatives = self.split_batch(batch)
                before, after = self.user_query_losses(params, non_trainable, episode,
                                                       negatives=negatives)
                weight = real_users(episode.query_mask, before.dtype)
                return before, after, weight

            return eval_fn

        # Cached per value of the traced settings: changing e.g. learner.inner_lr takes effect.
        return self.runtime.kernels.get(self, "evaluate", build)

    # ------------------------------------------------------------------ per-user calls
    # One line each: the Personalizer (``self.runtime``, ``metarec.runtime``) does the work.
    def _require_encoder(self):
        return require_encoder(self.encoder)

    def adapt(self, interactions, user_features=None, unknown_ids=None):
        """Adapt the meta-model to one user's few interactions (a DataFrame with ``item_id`` and
        ``rating``); returns an ``AdaptedUser`` with ``score`` and ``recommend``.

        ``unknown_ids``: ``"warn"`` (default: ``learner.runtime.unknown_ids``), ``"error"`` or
        ``"ignore"`` for item ids outside the catalogue and unknown feature names
        (``metarec.unknown_ids``); the same in every call below that takes raw ids."""
        return self.runtime.adapt(interactions, user_features, unknown_ids)

    def adapt_many(self, supports, user_features=None, unknown_ids=None):
        """Adapt to many users at once (one vectorised, compiled call per bucket of users)."""
        return self.runtime.adapt(frame_list(supports), user_features, unknown_ids)

    def adapt_flat(self, item_ids, ratings, lengths, user_features=None, unknown_ids=None):
        """``adapt_many`` for interactions given as flat arrays, the way a batch job holds them:
        user ``u``'s support is the next ``lengths[u]`` entries of ``item_ids`` / ``ratings``
        (raw item ids and ratings, checked as ``adapt_many`` checks them). Faster than building
        one DataFrame per user."""
        return self.runtime.adapt(FlatSupports(item_ids, ratings, lengths), user_features, unknown_ids)

    def adapt_indices(self, item_index, ratings, lengths, user_features=None, seen_items=None,
                      ratings_checked=False, min_support_pad=0, min_users_pad=0):
        """``adapt_flat`` for items already encoded (``encoder.item_index``), as a server that
        validated them holds them. ``seen_items``: each user's raw ids (what ``recommend``
        excludes); by default the raw ids of ``item_index``. ``ratings_checked=True``: the
        caller has already checked the ratings by ``metarec.ratings`` (as the server's request
        validation does), and they are not checked again. ``min_support_pad`` and
        ``min_users_pad``: pad the supports to at least this length and the users axis to at
        least this many rows, to reuse a shape already compiled (the result is the same)."""
        return self.runtime.adapt(EncodedSupports(item_index, ratings, lengths, seen_items, ratings_checked,
                                                  min_support_pad, min_users_pad), user_features)

    def adapt_score_indices(self, item_index, ratings, lengths, candidate_index,
                            user_features=None, seen_items=None, head="rating",
                            ratings_checked=False, min_support_pad=0, min_users_pad=0):
        """``adapt_indices`` and then ``score_indices`` in one compiled call: one dispatch,
        and the adapted weights stay on the device between the two (the server's path).

        ``candidate_index``: one encoded array shared by every user, one per user, or None
        (the whole catalogue). ``ratings_checked``, ``min_support_pad`` and ``min_users_pad``:
        as in ``adapt_indices``. Returns (adapted users, one score array per user).
        """
        return self.runtime.adapt_and_score(
            EncodedSupports(item_index, ratings, lengths, seen_items, ratings_checked, min_support_pad,
                            min_users_pad),
            EncodedCandidates(candidate_index), user_features, head)

    def adapt_recommend_many(self, supports, k=10, exclude_seen=True, candidates=None,
                             user_features=None, unknown_ids=None):
        """``recommend_many(adapt_many(supports, user_features), k, exclude_seen, candidates)``
        in one compiled call: one dispatch, and the adapted weights stay on the device (they
        are not returned; use ``adapt_many`` to keep them). The quickest way to rank items
        for users seen once, such as a cold-start request."""
        return self.runtime.recommend(frame_list(supports), k, exclude_seen, candidates, user_features,
                                      unknown_ids)

    def score_many(self, adapted_users, candidates=None, head="rating", unknown_ids=None):
        """Scores of each user's candidates (raw item ids; None = whole catalogue).

        ``head="rating"`` (default): predicted ratings (probabilities for implicit feedback).
        ``head="ranking"``: the scores ``recommend`` ranks by; the same as the ratings except
        for a model with a separate ranking head (``models.two_tower``), whose ranking scores
        are unnormalised logits over the catalogue."""
        return self.runtime.score(list(adapted_users), candidates, head, unknown_ids)

    def score_indices(self, adapted_users, item_index, head="rating", min_users_pad=0):
        """``score_many`` for candidates already encoded (``encoder.item_index``): one int array
        shared by every user, a list of one array per user, or None (the whole catalogue).
        ``min_users_pad``: as in ``adapt_indices``."""
        return self.runtime.score(list(adapted_users), EncodedCandidates(item_index), head,
                                  min_users_pad=min_users_pad)

    def recommend_many(self, adapted_users, k=10, exclude_seen=True, candidates=None, unknown_ids=None):
        """Top-``k`` (item ids, scores) per user, best first; seen items excluded by default."""
        return self.runtime.recommend(list(adapted_users), k, exclude_seen, candidates,
                                      unknown_ids=unknown_ids)

    def predict_items(self, item_ids, user_features=None):
        """Plain, non-adaptive scores of raw item ids for one user (the reference point)."""
        return self.runtime.predict(item_ids, user_features)

    def has_ranking_head(self):
        """Whether the model has a separate ``"ranking"`` output (``models.two_tower``):
        ``recommend`` then ranks by it, while ``score`` keeps returning the rating head."""
        return self.runtime.has_ranking_head()

    def release_kernels(self):
        """Drop the compiled adaptation, scoring and evaluation kernels; they are rebuilt on
        the next call. Each combination of settings (``TRACED_SETTINGS``: ``inner_steps``,
        ``inner_lr``, ...) keeps its own compiled program, so a sweep over settings should
        release them as it goes."""
        self.runtime.release_kernels()

    # ------------------------------------------------------------------ saving
    def get_config(self):
        config = super().get_config()
        adapt = self.adapt_spec
        if callable(adapt) and not isinstance(adapt, str):
            # A callable cannot be serialised: store the variable paths it selected.
            paths = [self.model.trainable_variables[i].path for i in self.forward.adapt_index]
            adapt = ["^" + re.escape(p) + "$" for p in paths]
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "inner_steps": self.inner_steps,
                "inner_lr": self.inner_lr,
                "adapt": list(adapt) if isinstance(adapt, tuple) else adapt,
                "clipnorm": self.clipnorm,
                "proximal": self.proximal,
                "learn_inner_lr": self.learn_inner_lr,
                "feedback": self.feedback,
                "objective": None if self.objective is None else self.objective.get_config(),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        if config.get("objective") is not None:
            config["objective"] = CatalogueObjective.from_config(config["objective"])
        return cls(**config)

    def save_assets(self, dir_path):
        """Keras calls this while saving: the feature encoder (and a catalogue objective's item
        counts) travel inside the .keras file."""
        sampler = None if self.objective is None else self.objective.sampler
        if sampler is not None and sampler.item_counts is not None:
            np.save(os.path.join(dir_path, "sampler_item_counts.npy"), sampler.item_counts)
        if self.encoder is None:
            return
        with open(os.path.join(dir_path, "encoder.json"), "w") as f:
            json.dump(self.encoder.get_config(), f)
        np.savez(os.path.join(dir_path, "encoder.npz"), **self.encoder.to_arrays())

    def load_assets(self, dir_path):
        counts = os.path.join(dir_path, "sampler_item_counts.npy")
        if self.objective is not None and os.path.exists(counts):
            self.objective.sampler.fit(np.load(counts, allow_pickle=False))
        path = os.path.join(dir_path, "encoder.json")
        if not os.path.exists(path):
            return
        from metarec.encoding import FeatureEncoder

        with open(path) as f:
            config = json.load(f)
        with np.load(os.path.join(dir_path, "encoder.npz"), allow_pickle=False) as arrays:
            self.encoder = FeatureEncoder.from_config(config, dict(arrays))
