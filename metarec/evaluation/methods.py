"""The pluggable method interface of the evaluation, and the mean baselines of protocol Q1.

A *method* is anything that can be trained on meta-train users and then, for many unseen
users at once, turn each user's support set into predicted ratings for a list of items:

* :class:`UserQuery` is what a method sees of an evaluation user: the support rows, the
  user's raw features and the item ids to score - never the query ratings.
* :class:`Method` is the interface (``name``, ``fit``, ``predict_many``); the evaluation
  loop (:func:`metarec.evaluation.report.run_evaluation`) only talks to it.
* :class:`LearnerMethod` plugs a ``metarec`` meta-learner (anything with ``fit``,
  ``adapt_many`` and ``score_many``) into that interface.
* :class:`GlobalMean`, :class:`ItemMean` and :class:`ItemMeanUserOffset` are baselines 1-3
  of BENCHMARK.md. Their hyper-parameters are tuned by :meth:`TunableMethod.tune` on the
  *validation* users that ``fit`` receives; test users never reach ``fit``.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from metarec.metrics import mae

__all__ = [
    "GlobalMean",
    "ItemMean",
    "ItemMeanUserOffset",
    "LearnerMethod",
    "Method",
    "TunableMethod",
    "UserQuery",
    "queries_from_tasks",
    "user_features_of",
]

#: Damping values tried by the baselines: from "no shrinkage" to "mostly the prior".
DEFAULT_DAMPING_GRID = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


class UserQuery(NamedTuple):
    """One evaluation user as a method sees it.

    Attributes:
        support: the user's known interactions, a frame with ``item_id``, ``rating`` and
            (when the data has them) ``timestamp`` columns, in time order.
        user_features: raw user feature values by column name (may be empty).
        item_ids: the raw item ids to predict, in the order the output must follow.
    """

    support: pd.DataFrame
    user_features: dict
    item_ids: np.ndarray


def user_features_of(users: pd.DataFrame | None, user_id: Any) -> dict:
    """Raw features of one user from a frame indexed by ``user_id`` ({} when unknown)."""
    if users is None or user_id not in users.index:
        return {}
    return users.loc[user_id].to_dict()


def queries_from_tasks(tasks, users: pd.DataFrame | None = None) -> tuple[list[UserQuery], list[np.ndarray]]:
    """The users of a ``TaskSet`` as queries over their own query items, with the truth.

    Returns ``(queries, truths)``: ``queries[i].item_ids`` are user ``i``'s query items and
    ``truths[i]`` their true ratings in the same order. ``users`` (``InteractionData.users``)
    supplies raw user features; without it they are empty, which is enough for methods that
    ignore features (the mean baselines).
    """
    queries, truths = [], []
    for i in range(len(tasks)):
        support = tasks.support_frame(i)
        query = tasks.query_frame(i)
        features = user_features_of(users, tasks.user_ids[i])
        queries.append(UserQuery(support, features, query["item_id"].to_numpy()))
        truths.append(query["rating"].to_numpy(dtype=np.float64))
    return queries, truths


# --------------------------------------------------------------------------- interface
class Method(abc.ABC):
    """A recommender that the evaluation can train and query.

    Subclasses set ``name`` and implement :meth:`fit` and :meth:`predict_many`.

    Attributes:
        name: label used in reports (unique among the methods of one evaluation).
        deterministic: ``True`` when ``fit`` ignores the seed, so the evaluation runs it
            with one seed only instead of wasting time on identical reruns.
        is_baseline: ``True`` for the reference methods; the report tests every method
            against the strongest of them (per metric).
        predicts_ratings: ``False`` for methods whose outputs are ranking scores, not
            ratings (the catalogue-ranking baselines): no MAE / RMSE is reported for them.
    """

    name: str = "method"
    deterministic: bool = False
    is_baseline: bool = False
    predicts_ratings: bool = True

    @abc.abstractmethod
    def fit(self, train_tasks, val_tasks=None, seed: int = 0) -> Method:
        """Train on ``train_tasks`` (meta-train users, every rating usable); choose
        hyper-parameters on ``val_tasks`` only. Must reset any previous fit. Returns self."""

    @abc.abstractmethod
    def predict_many(self, users: Sequence[UserQuery]) -> list[np.ndarray]:
        """For each user, the predicted rating (explicit) or score (implicit) of every id in
        ``user.item_ids``, as a float array of the same length and order."""

    def rank_many(self, users: Sequence[UserQuery]) -> list[np.ndarray] | None:
        """Ranking scores of ``user.item_ids`` when they differ from ``predict_many``'s (a
        model with a separate ranking head); None: the catalogue is ranked by the predictions."""
        return None

    def unadapted_rank_many(self, users: Sequence[UserQuery]) -> list[np.ndarray] | None:
        """For an adaptive method, the ranking scores of its model *before* adapting to each
        user (the personalization diagnostic); None for a method that does not adapt."""
        return None

    def get_params(self) -> dict[str, Any]:
        """Hyper-parameters in use (recorded in reports); none by default."""
        return {}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


class TunableMethod(Method):
    """A method with a grid of hyper-parameters picked by validation MAE.

    Subclasses define ``param_names``, fill ``self.param_grid`` (a list of dicts) and
    implement :meth:`_fit_statistics` (everything that depends on training data only).
    """

    param_names: tuple[str, ...] = ()

    def __init__(self, param_grid: Sequence[Mapping[str, float]] | None, params: Mapping[str, float]):
        self.params = dict(params)
        self.param_grid = [dict(p) for p in (param_grid if param_grid is not None else [params])]
        for candidate in self.param_grid + [self.params]:
            self._check_params(candidate)
        self.tuning_results_: pd.DataFrame | None = None
        self.rating_range: tuple[float, float] | None = None

    def _check_params(self, params: Mapping[str, float]) -> None:
        if set(params) != set(self.param_names):
            raise ValueError(f"{type(self).__name__} takes parameters {self.param_names}, "
                             f"got {sorted(params)}")
        for key, value in params.items():
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")

    def get_params(self) -> dict[str, Any]:
        return dict(self.params)

    def set_params(self, **params: float) -> TunableMethod:
        merged = {**self.params, **params}
        self._check_params(merged)
        self.params = merged
        return self

    @abc.abstractmethod
    def _fit_statistics(self, train_frame: pd.DataFrame) -> None:
        """Learn what the predictions need from meta-train users' interactions."""

    def fit(self, train_tasks, val_tasks=None, seed: int = 0) -> TunableMethod:
        """Learn statistics from ``train_tasks.frame()``, then tune on ``val_tasks``.

        ``seed`` is ignored: these methods are deterministic. With no validation users, or
        a one-point grid, the current parameters are kept.
        """
        del seed
        self.rating_range = train_tasks.encoder.schema.rating_range
        self._fit_statistics(train_tasks.frame())
        if val_tasks is not None and len(val_tasks) and len(self.param_grid) > 1:
            self.tune(*queries_from_tasks(val_tasks))
        return self

    def tune(self, queries: Sequence[UserQuery], truths: Sequence[np.ndarray]) -> dict[str, float]:
        """Set and return the grid point with the lowest mean per-user MAE on these users.

        Pass validation users only: this is the hyper-parameter search. Ties go to the
        earliest grid point. The whole grid's scores are kept in ``tuning_results_``.
        """
        if len(queries) != len(truths) or not len(queries):
            raise ValueError(f"tune needs the same non-zero number of queries and truths, "
                             f"got {len(queries)} and {len(truths)}")
        scores = []
        for params in self.param_grid:
            self.set_params(**params)
            predictions = self.predict_many(queries)
            per_user = [mae(t, p, self.rating_range) for t, p in zip(truths, predictions) if len(t)]
            scores.append({**params, "val_mae": float(np.mean(per_user))})
        self.tuning_results_ = pd.DataFrame(scores)
        best = int(np.argmin(self.tuning_results_["val_mae"].to_numpy()))  # first minimum
        self.set_params(**self.param_grid[best])
        return dict(self.params)


def _grid(**axes: Sequence[float]) -> list[dict[str, float]]:
    """Cartesian product of named value lists, as a list of parameter dicts."""
    names = list(axes)
    return [dict(zip(names, map(float, values))) for values in itertools.product(*axes.values())]


# --------------------------------------------------------------------------- baselines
class _MeanBaseline(TunableMethod):
    """Shared statistics of the mean baselines: the global mean and per-item sums / counts
    of the meta-train users' ratings (deterministic, so one seed is enough)."""

    deterministic = True
    is_baseline = True
    global_mean_: float | None = None
    _item_sum: pd.Series | None = None
    _item_count: pd.Series | None = None

    def _fit_statistics(self, train_frame: pd.DataFrame) -> None:
        if len(train_frame) == 0:
            raise ValueError("the training tasks have no interactions: got an empty frame")
        self.global_mean_ = float(train_frame["rating"].mean())
        grouped = train_frame.groupby("item_id")["rating"]
        self._item_sum = grouped.sum().astype(np.float64)
        self._item_count = grouped.count().astype(np.float64)

    def _check_fitted(self) -> None:
        if self.global_mean_ is None:
            raise ValueError(f"{self.name}: call fit before predict_many")

    def _item_predictions(self, item_ids: np.ndarray, damping: float) -> np.ndarray:
        """Damped item means of raw ids (the global mean for items without a rating)."""
        self._check_fitted()
        position = self._item_sum.index.get_indexer(item_ids)
        known = position >= 0
        sums = np.where(known, self._item_sum.to_numpy()[position], 0.0)
        counts = np.where(known, self._item_count.to_numpy()[position], 0.0)
        denominator = counts + damping
        with np.errstate(invalid="ignore", divide="ignore"):
            predicted = (sums + damping * self.global_mean_) / denominator
        return np.where(denominator > 0, predicted, self.global_mean_)

    def _item_predictions_per_user(self, item_id_lists: Sequence[np.ndarray], damping: float) -> list[np.ndarray]:
        """One vectorised lookup for all users' items, split back per user."""
        if not len(item_id_lists):
            return []
        lengths = [len(ids) for ids in item_id_lists]
        all_ids = np.concatenate([np.asarray(ids) for ids in item_id_lists])
        return np.split(self._item_predictions(all_ids, damping), np.cumsum(lengths)[:-1])


class GlobalMean(_MeanBaseline):
    """Baseline 1: every prediction is the mean rating of the meta-train users."""

    name = "global mean"

    def __init__(self) -> None:
        super().__init__(None, {})

    def predict_many(self, users: Sequence[UserQuery]) -> list[np.ndarray]:
        self._check_fitted()
        return [np.full(len(u.item_ids), self.global_mean_) for u in users]


class ItemMean(_MeanBaseline):
    """Baseline 2: the item's mean rating, damped toward the global mean.

    ``prediction(i) = (sum of i's ratings + damping * global mean) / (count(i) + damping)``:
    a Bayesian average where the global mean counts as ``damping`` pseudo-ratings, so an
    item rated once does not get that single rating as its prediction. Items without a
    training rating get the global mean (also when ``damping = 0``).

    Args:
        damping: the value used until :meth:`tune` picks one from ``damping_grid``
            (``None``: no tuning, ``damping`` is final).
    """

    name = "item mean"
    param_names = ("damping",)

    def __init__(self, damping: float = 5.0, damping_grid: Sequence[float] | None = DEFAULT_DAMPING_GRID):
        grid = None if damping_grid is None else _grid(damping=damping_grid)
        super().__init__(grid, {"damping": float(damping)})

    def predict_many(self, users: Sequence[UserQuery]) -> list[np.ndarray]:
        return self._item_predictions_per_user([u.item_ids for u in users], self.params["damping"])


class ItemMeanUserOffset(_MeanBaseline):
    """Baseline 3: damped item mean plus the user's damped mean offset on their support.

    ``offset(u) = sum over support of (rating - item prediction) / (|support| + user_damping)``,
    shrunk toward 0 because a user's first ratings are a small, biased sample of their taste.

    Args:
        item_damping, user_damping: values used until :meth:`tune` picks a pair from the
            product of the two grids (a grid of ``None`` fixes that parameter).
    """

    name = "item mean + user offset"
    param_names = ("item_damping", "user_damping")

    def __init__(
        self,
        item_damping: float = 5.0,
        user_damping: float = 10.0,
        item_damping_grid: Sequence[float] | None = DEFAULT_DAMPING_GRID,
        user_damping_grid: Sequence[float] | None = DEFAULT_DAMPING_GRID,
    ):
        grid = None
        if item_damping_grid is not None or user_damping_grid is not None:
            grid = _grid(
                item_damping=[item_damping] if item_damping_grid is None else item_damping_grid,
                user_damping=[user_damping] if user_damping_grid is None else user_damping_grid,
            )
        super().__init__(grid, {"item_damping": float(item_damping), "user_damping": float(user_damping)})

    def user_offsets(self, users: Sequence[UserQuery]) -> np.ndarray:
        """Each user's damped support offset (0 for an empty support without damping)."""
        supports = [u.support for u in users]
        item_predictions = self._item_predictions_per_user(
            [s["item_id"].to_numpy() for s in supports], self.params["item_damping"])
        residual_sums = np.array([
            float(np.sum(s["rating"].to_numpy(np.float64) - p)) for s, p in zip(supports, item_predictions)
        ])
        denominator = np.array([len(s) for s in supports], dtype=np.float64) + self.params["user_damping"]
        with np.errstate(invalid="ignore", divide="ignore"):
            offsets = residual_sums / denominator
        return np.where(denominator > 0, offsets, 0.0)

    def predict_many(self, users: Sequence[UserQuery]) -> list[np.ndarray]:
        if not users:
            return []
        base = self._item_predictions_per_user([u.item_ids for u in users], self.params["item_damping"])
        return [b + o for b, o in zip(base, self.user_offsets(users))]


# --------------------------------------------------------------------------- learners
class LearnerMethod(Method):
    """Plugs a metarec meta-learner (``MAML``, ``Reptile``, ...) into the evaluation.

    Args:
        name: report label.
        build: ``build(train_tasks, seed) -> learner``, a fresh, compiled learner (so every
            seed starts from its own initialisation).
        fit_kwargs: extra arguments of ``learner.fit`` (``epochs``, ``batch_size``, ...).
        batch_users: users adapted and scored per call, to bound memory.

    ``fit`` meta-trains with the validation users as ``validation_data`` (for callbacks such
    as early stopping); ``predict_many`` adapts to each user's support with
    ``adapt_many`` and scores their items with ``score_many``.
    """

    def __init__(
        self,
        name: str,
        build: Callable[[Any, int], Any],
        fit_kwargs: Mapping[str, Any] | None = None,
        batch_users: int = 256,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if not callable(build):
            raise ValueError(f"build must be callable as build(train_tasks, seed), got {build!r}")
        if not isinstance(batch_users, int) or batch_users < 1:
            raise ValueError(f"batch_users must be a positive integer, got {batch_users!r}")
        self.name = name
        self.build = build
        self.fit_kwargs = dict(fit_kwargs or {})
        self.batch_users = batch_users
        self.learner = None

    def get_params(self) -> dict[str, Any]:
        return dict(self.fit_kwargs)

    def fit(self, train_tasks, val_tasks=None, seed: int = 0) -> LearnerMethod:
        self.learner = self.build(train_tasks, seed)
        kwargs = {"verbose": 0, **self.fit_kwargs, "seed": seed}
        if val_tasks is not None and not len(val_tasks):
            val_tasks = None  # fit refuses an empty validation set
        self.learner.fit(train_tasks, validation_data=val_tasks, **kwargs)
        return self

    def predict_many(self, users: Sequence[UserQuery]) -> list[np.ndarray]:
        if self.learner is None:
            raise ValueError(f"{self.name}: call fit before predict_many")
        return learner_scores(self.learner, users, self.batch_users)

    def rank_many(self, users: Sequence[UserQuery]) -> list[np.ndarray] | None:
        if self.learner is None:
            raise ValueError(f"{self.name}: call fit before rank_many")
        if not self.learner.has_ranking_head():
            return None
        return learner_scores(self.learner, users, self.batch_users, head="ranking")

    def unadapted_rank_many(self, users: Sequence[UserQuery]) -> list[np.ndarray] | None:
        if self.learner is None:
            raise ValueError(f"{self.name}: call fit before unadapted_rank_many")
        return unadapted_scores(self.learner, users, self.batch_users)


def learner_scores(learner, users: Sequence[UserQuery], batch_users: int = 256,
                   head: str = "rating") -> list[np.ndarray]:
    """Adapt ``learner`` to each user's support and score ``user.item_ids`` with ``head``
    ("rating", or "ranking": the scores ``recommend`` ranks by), in chunks of users."""
    out: list[np.ndarray] = []
    for start in range(0, len(users), batch_users):
        chunk = users[start:start + batch_users]
        adapted = learner.adapt_many([u.support for u in chunk], [u.user_features for u in chunk])
        scores = learner.score_many(adapted, candidates=[u.item_ids for u in chunk], head=head)
        out.extend(np.asarray(s, dtype=np.float64) for s in scores)
    return out


def unadapted_scores(learner, users: Sequence[UserQuery], batch_users: int = 256) -> list[np.ndarray]:
    """The ranking scores of ``learner`` with zero inner steps: the meta-learned start, before
    any gradient step on the user's support (a memory-based learner still reads the support).
    The learner's own setting is restored afterwards."""
    steps = learner.inner_steps
    try:
        learner.inner_steps = 0
        return learner_scores(learner, users, batch_users, head="ranking")
    finally:
        learner.inner_steps = steps
        learner.release_kernels()
