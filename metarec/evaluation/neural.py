"""Neural methods of protocol Q1: baselines 4 and 5 and the meta-learners.

* :class:`GlobalModel` (baseline 4): the Keras model trained the ordinary way on every rating
  of the meta-train users (``metarec.pretraining.fit_global_model``), early stopping on the
  validation users' ratings, no per-user adaptation.
* :class:`FineTune` (baseline 5): that same trained global model adapted to each user by
  plain SGD steps on their support set. A ``metarec.MAML`` wrapped around the trained model
  *without* meta-training does exactly this in ``adapt_many``; the number of steps, the
  learning rate and the adapted subset are tuned by validation MAE.
* :func:`meta_learner_method`: a MAML / first-order MAML / Meta-SGD / Reptile learner as a
  :class:`~metarec.evaluation.methods.LearnerMethod`, meta-trained with early stopping on
  the validation users' post-adaptation query loss, the same stopping rule as the global
  model's, so the training budgets are comparable.
* :func:`inner_step_curve`: MAE against the number of inner steps of a fitted adaptive
  method, by re-adapting with other ``inner_steps`` (kernels are cached per step count).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from metarec.evaluation.methods import LearnerMethod, Method, UserQuery, learner_scores, queries_from_tasks
from metarec.metrics import mae

__all__ = [
    "FineTune",
    "GlobalModel",
    "adaptive_learner",
    "inner_step_curve",
    "meta_learner_method",
    "predict_with_learner",
    "predict_without_adaptation",
]

DEFAULT_STEPS_GRID = (1, 3, 5, 10)
DEFAULT_LR_GRID = (0.003, 0.01, 0.03, 0.1)
DEFAULT_ADAPT_GRID = ("decision_layers", "all")
LEARNER_KINDS = ("maml", "fomaml", "meta-sgd", "reptile", "memory", "lstm-optimizer")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _default_model(encoder):
    from metarec.models import rating_mlp

    return rating_mlp(encoder)


def predict_with_learner(learner, users: Sequence[UserQuery], batch_users: int = 256) -> list[np.ndarray]:
    """Adapt ``learner`` to each user's support and score ``user.item_ids`` (chunked)."""
    if learner.inner_steps == 0:
        return predict_without_adaptation(learner, users)
    return learner_scores(learner, users, batch_users)


def predict_without_adaptation(learner, users: Sequence[UserQuery]) -> list[np.ndarray]:
    """The learner's shared (meta-)model on each user's items, with no adaptation step.

    Used for zero inner steps: ``adapt_many`` with ``inner_steps=0`` currently fails inside
    the TensorFlow vectorised map, and predicting directly is cheaper anyway.
    """
    encoder = learner.encoder
    parts, sizes = [], []
    for user in users:
        idx = encoder.item_index(np.asarray(user.item_ids))
        inputs = encoder.item_inputs(idx)
        features = encoder.user_inputs_from_features(dict(user.user_features or {}))
        inputs.update({k: np.repeat(v, len(idx), axis=0) for k, v in features.items()})
        parts.append(inputs)
        sizes.append(len(idx))
    if not parts:
        return []
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out = learner.model.predict(batch, batch_size=8192, verbose=0)
    if isinstance(out, dict):  # a two-headed model: the rating head
        out = out.get("rating", next(iter(out.values())))
    scores = np.asarray(out, np.float64).reshape(-1)
    if learner.feedback == "implicit":
        scores = 1.0 / (1.0 + np.exp(-scores))
    return list(np.split(scores, np.cumsum(sizes)[:-1]))


def adaptive_learner(method: Method):
    """The fitted meta-learner behind ``method`` (None when it does not adapt per user)."""
    if isinstance(method, GlobalModel) and not isinstance(method, FineTune):
        return None
    return getattr(method, "learner", None)


def inner_step_curve(method: Method, protocol, k: int = 10, steps: Sequence[int] = range(11),
                     split: str = "test", metric: str = "mae") -> dict[int, float]:
    """Mean per-user ``metric`` (default MAE; e.g. "recall@20") of a fitted adaptive
    ``method`` on ``split`` at ``k`` for each number of inner steps (the learner's own
    setting is restored afterwards).

    This is a diagnostic of a method already fitted and tuned on validation users; it
    chooses nothing.
    """
    learner = adaptive_learner(method)
    if learner is None:
        raise ValueError(f"{method.name!r} has no fitted meta-learner to re-adapt; got {method!r}")
    steps = [int(s) for s in steps]
    if not steps or any(s < 0 for s in steps):
        raise ValueError(f"steps must be integers >= 0, got {steps!r}")
    original = learner.inner_steps
    curve = {}
    try:
        for s in steps:
            learner.inner_steps = s
            curve[s] = float(np.nanmean(protocol.evaluate_method(method, split=split, k=k)[metric]))
            # One compiled program per step count would otherwise stay in memory: over a
            # dozen methods and 11 step counts that exhausted a 24 GB machine.
            learner.release_kernels()
    finally:
        learner.inner_steps = original
    return curve


# --------------------------------------------------------------------------- baseline 4
class GlobalModel(Method):
    """Baseline 4: the model trained the ordinary way, with no per-user adaptation.

    Args:
        model_fn: ``model_fn(encoder) -> built keras.Model`` (default ``rating_mlp``).
        epochs: the most epochs; training stops early on the validation users' ratings
            (``patience`` epochs without improvement) and keeps the best weights.
        batch_size: ratings per gradient step.
        learning_rate: Adam's learning rate.
        name: report label.

    Trained models are kept per (training users, seed), so a :class:`FineTune` built on
    this object reuses them instead of training the same network twice.
    """

    is_baseline = True

    def __init__(self, model_fn: Callable | None = None, epochs: int = 30, batch_size: int = 256,
                 learning_rate: float = 1e-3, patience: int = 2, name: str = "global model") -> None:
        self.model_fn = model_fn or _default_model
        self.epochs = _positive_int("epochs", epochs)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.patience = _positive_int("patience", patience)
        if not (np.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}")
        self.learning_rate = float(learning_rate)
        self.name = name
        self.learner = None
        self.epochs_trained_: int | None = None
        self._trained: dict[tuple, tuple[Any, int]] = {}

    def get_params(self) -> dict[str, Any]:
        return {"max_epochs": self.epochs, "epochs_trained": self.epochs_trained_}

    def trained_model(self, train_tasks, val_tasks, seed: int):
        """The global model for these training users and seed (trained once, then reused)."""
        import keras

        from metarec.pretraining import fit_global_model

        key = (id(train_tasks), len(train_tasks), id(val_tasks), int(seed))
        if key not in self._trained:
            keras.utils.set_random_seed(int(seed))
            model = self.model_fn(train_tasks.encoder)
            callbacks = None
            if val_tasks is not None and len(val_tasks):
                callbacks = [keras.callbacks.EarlyStopping(patience=self.patience, restore_best_weights=True)]
            history = fit_global_model(model, train_tasks, val_tasks if callbacks else None,
                                       epochs=self.epochs, batch_size=self.batch_size,
                                       optimizer=keras.optimizers.Adam(self.learning_rate),
                                       callbacks=callbacks, verbose=0)
            self._trained[key] = (model, len(history.history["loss"]))
        return self._trained[key]

    def _wrap(self, model, encoder, inner_steps=0, inner_lr=0.0, adapt="decision_layers"):
        from metarec.maml import MAML

        return MAML(model, inner_steps=inner_steps, inner_lr=inner_lr, adapt=adapt,
                    encoder=encoder, feedback=encoder.schema.feedback)

    def fit(self, train_tasks, val_tasks=None, seed: int = 0) -> GlobalModel:
        model, self.epochs_trained_ = self.trained_model(train_tasks, val_tasks, seed)
        self.learner = self._wrap(model, train_tasks.encoder)
        return self

    def predict_many(self, users: Sequence[UserQuery]) -> list[np.ndarray]:
        if self.learner is None:
            raise ValueError(f"{self.name}: call fit before predict_many")
        return predict_with_learner(self.learner, users)


# --------------------------------------------------------------------------- baseline 5
class FineTune(GlobalModel):
    """Baseline 5: the global model fine-tuned per user by SGD on the support set.

    Every combination of ``steps_grid`` x ``lr_grid`` x ``adapt_grid`` is scored by mean
    per-user MAE on the validation users (support → query), and the best is kept; the whole
    grid is in ``tuning_results_``. ``users`` (``InteractionData.users``) supplies the
    validation users' raw features during tuning.

    Args:
        base: the :class:`GlobalModel` whose trained networks are fine-tuned (shared, so the
            two rows of a report use the very same global model); a fresh one by default.
    """

    def __init__(self, base: GlobalModel | None = None, users: pd.DataFrame | None = None,
                 steps_grid: Sequence[int] = DEFAULT_STEPS_GRID,
                 lr_grid: Sequence[float] = DEFAULT_LR_GRID,
                 adapt_grid: Sequence[Any] = DEFAULT_ADAPT_GRID, name: str = "fine-tune") -> None:
        base = base if base is not None else GlobalModel()
        if not isinstance(base, GlobalModel):
            raise ValueError(f"base must be a GlobalModel, got {base!r}")
        super().__init__(base.model_fn, base.epochs, base.batch_size, base.learning_rate,
                         base.patience, name=name)
        self._trained = base._trained  # share trained networks with the baseline-4 row
        self.users = users
        self.steps_grid = tuple(_positive_int("steps", s) for s in steps_grid)
        self.lr_grid = tuple(float(lr) for lr in lr_grid)
        if not self.steps_grid or not self.lr_grid or not adapt_grid:
            raise ValueError(f"every grid needs a value, got steps={steps_grid!r}, "
                             f"lr={lr_grid!r}, adapt={adapt_grid!r}")
        for lr in self.lr_grid:
            if not (np.isfinite(lr) and lr > 0):
                raise ValueError(f"learning rates must be finite numbers > 0, got {lr!r}")
        self.adapt_grid = tuple(adapt_grid)
        self.params = {"steps": self.steps_grid[0], "lr": self.lr_grid[0], "adapt": self.adapt_grid[0]}
        self.tuning_results_: pd.DataFrame | None = None

    def get_params(self) -> dict[str, Any]:
        return {**self.params, "epochs_trained": self.epochs_trained_}

    def fit(self, train_tasks, val_tasks=None, seed: int = 0) -> FineTune:
        model, self.epochs_trained_ = self.trained_model(train_tasks, val_tasks, seed)
        encoder = train_tasks.encoder
        if val_tasks is not None and len(val_tasks):
            self.params = self._tune(model, encoder, val_tasks)
        self.learner = self._wrap(model, encoder, self.params["steps"], self.params["lr"],
                                  self.params["adapt"])
        return self

    def _tune(self, model, encoder, val_tasks) -> dict[str, Any]:
        queries, truths = queries_from_tasks(val_tasks, self.users)
        rating_range = encoder.schema.rating_range
        rows = []
        for adapt, lr in itertools.product(self.adapt_grid, self.lr_grid):
            # The learning rate is baked into the compiled kernels: one wrapper per rate.
            learner = self._wrap(model, encoder, self.steps_grid[0], lr, adapt)
            for steps in self.steps_grid:
                learner.inner_steps = steps
                predictions = predict_with_learner(learner, queries)
                per_user = [mae(t, p, rating_range) for t, p in zip(truths, predictions) if len(t)]
                rows.append({"steps": steps, "lr": lr, "adapt": adapt, "val_mae": float(np.mean(per_user))})
        self.tuning_results_ = pd.DataFrame(rows)
        best = self.tuning_results_.iloc[int(np.argmin(self.tuning_results_["val_mae"].to_numpy()))]
        return {"steps": int(best["steps"]), "lr": float(best["lr"]), "adapt": best["adapt"]}


# --------------------------------------------------------------------------- meta-learners
def meta_learner_method(
    name: str,
    kind: str = "maml",
    model_fn: Callable | None = None,
    inner_steps: int = 1,
    inner_lr: float = 0.01,
    adapt: Any = "decision_layers",
    learn_inner_lr: str | None = None,
    outer_lr: float = 1e-3,
    epochs: int = 30,
    batch_size: int = 32,
    patience: int = 3,
    max_query: int = 128,
    clipnorm: float | None = 5.0,
    learner_options: Mapping[str, Any] | None = None,
) -> LearnerMethod:
    """A meta-learner of ``kind`` ("maml", "fomaml", "meta-sgd", "reptile", "memory",
    "lstm-optimizer") as a method ("memory" is ``MemoryLearner``: a GRU reads the support set;
    ``inner_steps`` gradient steps follow, 0 for the purely memory-based form;
    "lstm-optimizer" is ``LSTMMetaLearner``: ``inner_steps`` of a learned, coordinate-wise LSTM
    update rule). ``learner_options``: further arguments of the learner's class (``form=``,
    ``hidden_size=`` ...).

    Meta-training runs at most ``epochs`` epochs and stops when the validation users'
    post-adaptation query loss has not improved for ``patience`` epochs, restoring the best
    weights (the same early stopping as :class:`GlobalModel`).
    """
    if kind not in LEARNER_KINDS:
        raise ValueError(f"kind must be one of {LEARNER_KINDS}, got {kind!r}")
    epochs = _positive_int("epochs", epochs)
    patience = _positive_int("patience", patience)
    model_fn = model_fn or _default_model

    def build(train_tasks, seed):
        import keras

        from metarec.learned_optimizer import LSTMMetaLearner
        from metarec.maml import MAML, MetaSGD
        from metarec.memory import MemoryLearner
        from metarec.reptile import Reptile

        keras.utils.set_random_seed(int(seed))
        model = model_fn(train_tasks.encoder)
        common = dict(inner_steps=inner_steps, inner_lr=inner_lr, adapt=adapt, clipnorm=clipnorm,
                      encoder=train_tasks.encoder, feedback=train_tasks.encoder.schema.feedback,
                      **dict(learner_options or {}))
        if kind == "reptile":
            learner = Reptile(model, **common)
        elif kind == "memory":
            learner = MemoryLearner(model, learn_inner_lr=learn_inner_lr, **common)
        elif kind == "lstm-optimizer":
            learner = LSTMMetaLearner(model, **common)
        elif kind == "meta-sgd":
            learner = MetaSGD(model, learn_inner_lr=learn_inner_lr or "per_parameter", **common)
        else:
            learner = MAML(model, first_order=kind == "fomaml", learn_inner_lr=learn_inner_lr, **common)
        learner.compile(optimizer=keras.optimizers.Adam(outer_lr))
        return learner

    method = _EarlyStoppedLearnerMethod(name, build, {"epochs": epochs, "batch_size": batch_size,
                                                      "max_query": max_query})
    method.patience = patience
    method.settings = {"kind": kind, "inner_steps": inner_steps, "inner_lr": inner_lr,
                       "adapt": adapt if isinstance(adapt, str) else "custom",
                       "learn_inner_lr": learn_inner_lr, "outer_lr": outer_lr,
                       **dict(learner_options or {})}
    return method


class _EarlyStoppedLearnerMethod(LearnerMethod):
    """``LearnerMethod`` with early stopping on validation users and epochs recorded."""

    patience: int = 3
    settings: Mapping[str, Any] = {}

    def fit(self, train_tasks, val_tasks=None, seed: int = 0) -> _EarlyStoppedLearnerMethod:
        import keras

        self.learner = self.build(train_tasks, seed)
        kwargs = {"verbose": 0, **self.fit_kwargs, "seed": seed}
        if val_tasks is not None and not len(val_tasks):
            val_tasks = None  # no validation users: nothing to stop on (fit refuses an empty set)
        if val_tasks is not None:
            kwargs["callbacks"] = [keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=self.patience, restore_best_weights=True)]
        history = self.learner.fit(train_tasks, validation_data=val_tasks, **kwargs)
        self.epochs_trained_ = len(history.history.get("loss", []))
        return self

    def get_params(self) -> dict[str, Any]:
        return {**self.settings, "max_epochs": self.fit_kwargs.get("epochs"),
                "epochs_trained": getattr(self, "epochs_trained_", None)}

    def predict_many(self, users: Sequence[UserQuery]) -> list[np.ndarray]:
        if self.learner is None:
            raise ValueError(f"{self.name}: call fit before predict_many")
        return predict_with_learner(self.learner, users, self.batch_users)

    def unadapted_rank_many(self, users: Sequence[UserQuery]) -> list[np.ndarray] | None:
        if self.learner is None:
            raise ValueError(f"{self.name}: call fit before unadapted_rank_many")
        if self.learner.inner_steps == 0 and not self.learner.reads_support:
            return None  # nothing adapts: there is no "before"
        return super().unadapted_rank_many(users)


def item_mean_prior(encoder, train_tasks, val_tasks=None) -> np.ndarray:
    """``metarec.priors.item_mean_prior(train_tasks, val=val_tasks, encoder=encoder)``: damped
    item means per item index (damping tuned on ``val_tasks``). The prior of
    :func:`residual_method`; kept here under its former signature."""
    from metarec.priors import item_mean_prior as build

    return build(train_tasks, val=val_tasks, encoder=encoder)


class _ResidualLearnerMethod(_EarlyStoppedLearnerMethod):
    """Meta-learner over an item-mean prior computed from the training users (tuned on val)."""

    def fit(self, train_tasks, val_tasks=None, seed: int = 0):
        prior = item_mean_prior(train_tasks.encoder, train_tasks, val_tasks)
        build = self.build
        self.build = lambda tasks, s: build(tasks, s, prior)
        try:
            return super().fit(train_tasks, val_tasks, seed)
        finally:
            self.build = build


def residual_method(name: str = "residual-maml", inner_steps: int = 1, inner_lr: float = 0.01,
                    epochs: int = 30, patience: int = 3, memory: bool = False,
                    **learner_kwargs) -> LearnerMethod:
    """A meta-learner predicting on top of the damped item mean: second-order MAML
    (``presets.residual_maml``, ``learner_kwargs`` such as ``proximal`` or ``ranking_weight``
    passed on) or, with ``memory=True``, the memory-based ``presets.residual_memory``."""

    def build(train_tasks, seed, prior):
        import keras

        from metarec.presets import residual_maml, residual_memory

        keras.utils.set_random_seed(int(seed))
        if memory:
            return residual_memory(train_tasks.encoder, prior, inner_steps=inner_steps,
                                   inner_lr=inner_lr, **learner_kwargs)
        return residual_maml(train_tasks.encoder, prior, inner_steps=inner_steps, inner_lr=inner_lr,
                             **learner_kwargs)

    method = _ResidualLearnerMethod(name, build, {"epochs": epochs, "batch_size": 32, "max_query": 128})
    method.patience = patience
    extra = "".join(f", {k}={v!r}" for k, v in learner_kwargs.items())
    preset = "residual_memory" if memory else "residual_maml"
    method.settings = {"preset": f"{preset}(inner_steps={inner_steps}, inner_lr={inner_lr}{extra})"}
    return method


def catalogue_method(name: str = "catalogue-two-tower", epochs: int = 10, patience: int = 2,
                     batch_size: int = 32, max_query: int = 256, **preset_kwargs) -> LearnerMethod:
    """``presets.catalogue_two_tower`` as a method: the two-tower model whose ranking head
    ranks the catalogue (``rank_many``) and whose rating head gives the MAE, over the damped
    item mean of the training users (``item_prior``, damping tuned on validation users).

    Meta-training stops when the validation users' catalogue Recall@20 after adaptation has
    not improved for ``patience`` epochs, keeping the best weights.
    """
    epochs = _positive_int("epochs", epochs)
    patience = _positive_int("patience", patience)

    def build(train_tasks, seed, prior):
        import keras

        from metarec.presets import catalogue_two_tower

        keras.utils.set_random_seed(int(seed))
        return catalogue_two_tower(train_tasks, item_prior=prior, **preset_kwargs)

    method = _CatalogueLearnerMethod(name, build, {"epochs": epochs, "batch_size": batch_size,
                                                   "max_query": max_query})
    method.patience = patience
    extra = ", ".join(f"{k}={v!r}" for k, v in preset_kwargs.items())
    method.settings = {"preset": f"catalogue_two_tower(tasks, item_prior=item_mean_prior{', ' + extra if extra else ''})"}
    return method


def catalogue_recall_callback(val_tasks, relevance_threshold: float = 4.0, k: int = 20):
    """A Keras callback that logs ``val_recall@20``: the validation users' catalogue
    Recall@k after adaptation, measured as the protocol measures it (every item not in the
    support ranked; relevant = query items rated >= ``relevance_threshold``, or label 1).
    Early stopping on it stops meta-training where the top-k lists stop improving, which the
    query loss does not say."""
    import keras

    supports = [val_tasks.support_frame(i)[["item_id", "rating"]] for i in range(len(val_tasks))]
    features = [val_tasks.user_features(i) for i in range(len(val_tasks))]
    explicit = val_tasks.encoder.schema.feedback == "explicit"
    relevant = []
    for i in range(len(val_tasks)):
        query = val_tasks.query_frame(i)
        liked = query["rating"] >= relevance_threshold if explicit else query["rating"] > 0.5
        relevant.append(set(query.loc[liked, "item_id"].tolist()))

    class CatalogueRecall(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            lists = self.model.adapt_recommend_many(supports, k=k, exclude_seen=True,
                                                    user_features=features)
            hits = [len(set(ids.tolist()) & rel) / min(len(rel), k)
                    for (ids, _), rel in zip(lists, relevant) if rel]
            if logs is not None:
                logs["val_recall@20"] = float(np.mean(hits)) if hits else float("nan")

    return CatalogueRecall()


class _CatalogueLearnerMethod(_ResidualLearnerMethod):
    """Early stopping on the validation users' catalogue Recall@20
    (:func:`catalogue_recall_callback`)."""

    def fit(self, train_tasks, val_tasks=None, seed: int = 0):
        import keras

        prior = item_mean_prior(train_tasks.encoder, train_tasks, val_tasks)
        self.learner = self.build(train_tasks, seed, prior)
        kwargs = {"verbose": 0, **self.fit_kwargs, "seed": seed}
        if val_tasks is not None and len(val_tasks):
            kwargs["validation_data"] = val_tasks
            kwargs["callbacks"] = [catalogue_recall_callback(val_tasks), keras.callbacks.EarlyStopping(
                monitor="val_recall@20", mode="max", patience=self.patience, restore_best_weights=True)]
        history = self.learner.fit(train_tasks, **kwargs)
        self.epochs_trained_ = len(history.history.get("loss", []))
        return self
