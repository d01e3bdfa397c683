"""Protocol Q1 of BENCHMARK.md: user cold-start on explicit ratings, scored per user.

Split (deterministic): users ordered by their first interaction (ties by user id); the
first 70 % are meta-train users, the next 10 % validation, the last 20 % test. Each
validation / test user's interactions are sorted by (timestamp, item id); the first K are
the support, the rest the query. Every K is scored on the same users: the validation / test
users with at least ``eval_min_interactions`` interactions.

:class:`Q1Protocol` builds one :class:`metarec.tasks.UserTasks` per K, all sharing one
encoder, checks that nothing of a validation or test user reaches training, and scores a
fitted :class:`~metarec.evaluation.methods.Method` user by user
(:meth:`Q1Protocol.evaluate_method`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from metarec.encoding import FeatureEncoder
from metarec.evaluation.methods import Method, UserQuery, user_features_of
from metarec.metrics import (
    catalogue_ndcg_at_k,
    catalogue_recall_at_k,
    mae,
    ndcg_at_k,
    rank_items,
    rmse,
)
from metarec.interactions import InteractionData
from metarec.tasks import UserTasks

__all__ = ["DIAGNOSTIC_COLUMNS", "METRIC_COLUMNS", "Q1Protocol"]

#: Per-user figures of :meth:`Q1Protocol.evaluate_method`. ``ndcg@3`` / ``ndcg@10`` rank the
#: user's own query items (graded gain); ``recall@20`` / ``ndcg@20`` rank the catalogue
#: (binary gain).
METRIC_COLUMNS = ("mae", "rmse", "ndcg@3", "ndcg@10", "recall@20", "ndcg@20")
#: The personalization diagnostic of adaptive methods (NaN for the others): catalogue
#: Recall@20 of the model before adapting to the user, and the share of the top 20 that
#: adaptation leaves in place.
DIAGNOSTIC_COLUMNS = ("recall@20_unadapted", "overlap@20")
SPLITS = ("val", "test")


class _EvalUser(NamedTuple):
    """Everything needed to score one evaluation user (built once per split and K)."""

    user_id: Any
    query: UserQuery            # item_ids = catalogue minus support, then unknown query items
    n_catalogue: int            # the first n_catalogue item_ids are the catalogue to rank
    query_positions: np.ndarray  # positions of the query items within query.item_ids
    query_ratings: np.ndarray
    relevant: np.ndarray        # query item ids that count as relevant for catalogue ranking


class Q1Protocol:
    """The deterministic Q1 split of ``data`` at every K, and per-user scoring.

    Args:
        data: interactions with timestamps (explicit ratings for Q1 proper; implicit 0/1
            data works too, see :meth:`evaluate_method`).
        k_values: support sizes K; every K is scored on the same users.
        eval_min_interactions: validation / test users need at least this many
            interactions (Q1: 30), which must exceed every K so each user has a query.
        fractions: (train, validation, test) shares of the users.
        relevance_threshold: on explicit data, query items rated at least this are the
            relevant ones for catalogue ranking (Q1: 4). Implicit data uses label 1.

    Meta-train users keep every interaction (``min_interactions=1``), as Q1 requires, even
    those with K or fewer interactions (their query set is empty and contributes no loss).

    Raises:
        ValueError: bad arguments, or data without timestamps.
        RuntimeError: if the split leaks a validation / test user into training or the
            evaluation users differ between K values (a bug, never expected).
    """

    def __init__(
        self,
        data: InteractionData,
        k_values: Sequence[int] = (5, 10, 20),
        eval_min_interactions: int = 30,
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        relevance_threshold: float = 4.0,
    ) -> None:
        if not isinstance(data, InteractionData):
            raise ValueError(f"Q1Protocol needs an InteractionData, got {type(data).__name__}")
        if not data.has_timestamps:
            raise ValueError("Q1 splits by time: the data needs a 'timestamp' column; got columns "
                             f"{list(data.interactions.columns)}")
        k_values = tuple(k_values)
        if not k_values or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                               for k in k_values) or len(set(k_values)) != len(k_values):
            raise ValueError(f"k_values must be distinct positive integers, got {k_values!r}")
        if not isinstance(eval_min_interactions, (int, np.integer)) or eval_min_interactions <= max(k_values):
            raise ValueError(f"eval_min_interactions must be an integer larger than every K "
                             f"(max K = {max(k_values)}) so each user has a query, "
                             f"got {eval_min_interactions!r}")
        self.data = data
        self.k_values = tuple(int(k) for k in k_values)
        self.eval_min_interactions = int(eval_min_interactions)
        self.fractions = tuple(float(f) for f in fractions)
        self.relevance_threshold = float(relevance_threshold)
        # One encoder for every K: fitting reads ids and features only, never ratings.
        self.encoder = FeatureEncoder.fit(data)
        self._tasks = {
            k: UserTasks(data, support_size=k, split="time", user_split="time",
                         fractions=self.fractions, min_interactions=1,
                         eval_min_interactions=self.eval_min_interactions, encoder=self.encoder)
            for k in self.k_values
        }
        self._catalogue = self._catalogue_ids()
        self._eval_users: dict[tuple[str, int], list[_EvalUser]] = {}
        self.verify()

    # ------------------------------------------------------------------ the split
    def tasks(self, k: int) -> UserTasks:
        """The :class:`UserTasks` of support size ``k`` (``.train`` / ``.val`` / ``.test``)."""
        if k not in self._tasks:
            raise ValueError(f"k must be one of this protocol's k_values {self.k_values}, got {k!r}")
        return self._tasks[k]

    def user_ids(self, split: str) -> np.ndarray:
        """The evaluation users of ``split`` (identical at every K)."""
        return self._task_set(split, self.k_values[0]).user_ids

    @property
    def catalogue(self) -> np.ndarray:
        """Every item id the encoder knows, the ranking candidates before removing the support."""
        return self._catalogue

    def _task_set(self, split: str, k: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self.tasks(k), split)

    def _catalogue_ids(self) -> np.ndarray:
        ids = self.encoder.item_ids[1:]  # entry 0 is the out-of-vocabulary row
        try:
            # Typed ids (int64 for MovieLens) make lookups and JSON output cheaper.
            return np.asarray(ids.tolist(), dtype=self.data.interactions["item_id"].dtype)
        except (TypeError, ValueError):
            return ids

    def verify(self) -> None:
        """Check the no-leakage and same-users guarantees; raise ``RuntimeError`` if broken.

        * train, validation and test users are disjoint, and the training interactions
          (``train.frame()``) belong to meta-train users only;
        * users arrive in split order: every validation user's first interaction is no
          earlier than any meta-train user's, and likewise test after validation;
        * at every K the validation / test users are the same, support + query is the
          user's full history in (timestamp, item id) order, and support is its first K.
        """
        first_seen = self.data.interactions.groupby("user_id")["timestamp"].min()
        reference = {s: list(self._task_set(s, self.k_values[0]).user_ids) for s in SPLITS}
        for k, tasks in self._tasks.items():
            train_users = set(tasks.train.user_ids.tolist())
            held_out = set(tasks.val.user_ids.tolist()) | set(tasks.test.user_ids.tolist())
            if train_users & held_out:
                raise RuntimeError(f"K={k}: users {sorted(train_users & held_out)[:5]} are both "
                                   "meta-train and validation/test users")
            if set(tasks.val.user_ids.tolist()) & set(tasks.test.user_ids.tolist()):
                raise RuntimeError(f"K={k}: validation and test users overlap")
            leaked = set(tasks.train.frame()["user_id"].unique().tolist()) - train_users
            if leaked:
                raise RuntimeError(f"K={k}: training interactions include non-training users "
                                   f"{sorted(leaked)[:5]}")
            for split in SPLITS:
                if list(self._task_set(split, k).user_ids) != reference[split]:
                    raise RuntimeError(f"K={k}: the {split} users differ from K={self.k_values[0]}")
            self._verify_arrival_order(tasks, first_seen, k)
        for split in SPLITS:
            self._verify_support_query(split)

    @staticmethod
    def _verify_arrival_order(tasks: UserTasks, first_seen: pd.Series, k: int) -> None:
        """Later splits hold later-arriving users (ties are broken by user id)."""
        starts = [first_seen.loc[list(s.user_ids)] for s in (tasks.train, tasks.val, tasks.test)]
        for earlier, later in zip(starts, starts[1:]):
            if len(earlier) and len(later) and earlier.max() > later.min():
                raise RuntimeError(f"K={k}: a user of a later split arrived before one of an "
                                   f"earlier split ({later.min()} < {earlier.max()})")

    def _verify_support_query(self, split: str) -> None:
        history = self.data.interactions.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
        by_user = dict(tuple(history.groupby("user_id", sort=False)["item_id"]))
        for k in self.k_values:
            tasks = self._task_set(split, k)
            for i, user in enumerate(tasks.user_ids):
                expected = by_user[user].to_numpy()
                support = tasks.support_frame(i)["item_id"].to_numpy()
                query = tasks.query_frame(i)["item_id"].to_numpy()
                if (len(expected) < self.eval_min_interactions
                        or not np.array_equal(support, expected[:k])
                        or not np.array_equal(query, expected[k:])):
                    raise RuntimeError(f"K={k}: user {user!r} of {split} does not have support = "
                                       f"first {k} interactions by (timestamp, item id) and query = "
                                       "the rest")

    # ------------------------------------------------------------------ queries
    def eval_users(self, split: str = "test", k: int = 10) -> list[_EvalUser]:
        """Per user of ``split`` at K: the :class:`UserQuery` given to methods and the truth."""
        key = (split, k)
        if key not in self._eval_users:
            self._eval_users[key] = self._build_eval_users(self._task_set(split, k))
        return self._eval_users[key]

    def queries(self, split: str = "test", k: int = 10) -> list[UserQuery]:
        """The queries a method answers for ``split`` at K (support, features, items)."""
        return [u.query for u in self.eval_users(split, k)]

    def _is_relevant(self, ratings: np.ndarray) -> np.ndarray:
        if self.data.feedback == "implicit":
            return ratings == 1.0
        return ratings >= self.relevance_threshold

    def _build_eval_users(self, tasks) -> list[_EvalUser]:
        catalogue = self._catalogue
        catalogue_index = pd.Index(catalogue)
        users = []
        for i, user in enumerate(tasks.user_ids):
            support = tasks.support_frame(i)
            query = tasks.query_frame(i)
            query_ids = query["item_id"].to_numpy()
            # Candidates: the catalogue minus what the user already rated in the support.
            keep = ~catalogue_index.isin(support["item_id"])
            candidates = catalogue[keep]
            # Query items the encoder never saw still need a prediction for MAE; they go after
            # the catalogue part so they never enter the catalogue ranking.
            unknown = query_ids[catalogue_index.get_indexer(query_ids) < 0]
            item_ids = np.concatenate([candidates, unknown]) if len(unknown) else candidates
            positions = pd.Index(item_ids).get_indexer(query_ids)
            ratings = query["rating"].to_numpy(dtype=np.float64)
            users.append(_EvalUser(
                user_id=user,
                query=UserQuery(support, user_features_of(self.data.users, user), item_ids),
                n_catalogue=len(candidates),
                query_positions=positions,
                query_ratings=ratings,
                relevant=query_ids[self._is_relevant(ratings)],
            ))
        return users

    # ------------------------------------------------------------------ scoring
    def evaluate_method(self, method: Method, split: str = "test", k: int = 10) -> pd.DataFrame:
        """Score a *fitted* method on every user of ``split`` at support size ``k``.

        The method predicts, in one ``predict_many`` call, every catalogue item the user has
        not rated in the support (plus any query item outside the catalogue). From that:

        * ``mae`` / ``rmse`` over the query items, predictions clipped to the rating range
          (NaN on implicit data, where outputs are scores, not ratings, and for a method
          with ``predicts_ratings = False``);
        * ``ndcg@3`` / ``ndcg@10`` of the query items ranked by prediction, gain
          ``2**rating - 1``;
        * ``recall@20`` / ``ndcg@20`` of the catalogue ranking against the relevant query
          items (binary gain); NaN for a user with no relevant item, which the averages
          exclude (count them with ``n_relevant == 0``).

        A method with a separate ranking head (``rank_many``) ranks the catalogue by it; MAE
        and the nDCG of the query items (graded by rating) stay on its predicted ratings. For an adaptive
        method (``unadapted_rank_many``), :data:`DIAGNOSTIC_COLUMNS` compare its catalogue
        top 20 with that of its model before adaptation.

        Returns one row per user: ``user_id``, ``n_support``, ``n_query``, ``n_relevant``,
        ``n_candidates``, :data:`METRIC_COLUMNS` and :data:`DIAGNOSTIC_COLUMNS`.
        """
        if not isinstance(method, Method):
            raise ValueError(f"method must be a metarec.evaluation.Method, got {type(method).__name__}")
        users = self.eval_users(split, k)
        queries = [u.query for u in users]
        predictions = self._checked(method, "predict_many", method.predict_many(queries), users)
        ranking = method.rank_many(queries)
        ranking = predictions if ranking is None else self._checked(method, "rank_many", ranking, users)
        before = method.unadapted_rank_many(queries)
        if before is not None:
            before = self._checked(method, "unadapted_rank_many", before, users)
        rating_range = self.data.schema.rating_range if self.data.feedback == "explicit" else None
        rows = []
        for i, (user, predicted, ranked) in enumerate(zip(users, predictions, ranking)):
            row = self._score_user(user, predicted, rating_range, method.predicts_ratings, ranked)
            row.update(self._diagnostic(user, ranked, None if before is None else before[i]))
            rows.append(row)
        return pd.DataFrame(rows, columns=["user_id", "n_support", "n_query", "n_relevant",
                                           "n_candidates", *METRIC_COLUMNS, *DIAGNOSTIC_COLUMNS])

    @staticmethod
    def _checked(method: Method, what: str, arrays, users) -> list[np.ndarray]:
        """Each user's scores as a float64 vector of the right length, or a ValueError."""
        if len(arrays) != len(users):
            raise ValueError(f"{method.name}: {what} returned {len(arrays)} arrays for {len(users)} users")
        out = []
        for user, scores in zip(users, arrays):
            scores = np.asarray(scores, dtype=np.float64).reshape(-1)
            if scores.shape != (len(user.query.item_ids),):
                raise ValueError(f"{method.name}: user {user.user_id!r} needs "
                                 f"{len(user.query.item_ids)} scores from {what}, got shape {scores.shape}")
            out.append(scores)
        return out

    @staticmethod
    def _diagnostic(user: _EvalUser, ranked: np.ndarray, before: np.ndarray | None) -> dict:
        if before is None:
            return {name: float("nan") for name in DIAGNOSTIC_COLUMNS}
        catalogue = user.query.item_ids[:user.n_catalogue]
        after_top = rank_items(catalogue, ranked[:user.n_catalogue], k=20)
        before_top = rank_items(catalogue, before[:user.n_catalogue], k=20)
        overlap = len(set(after_top.tolist()) & set(before_top.tolist())) / max(len(after_top), 1)
        return {"recall@20_unadapted": catalogue_recall_at_k(before_top, user.relevant, 20),
                "overlap@20": overlap}

    def _score_user(self, user: _EvalUser, predicted: np.ndarray, rating_range,
                    predicts_ratings: bool = True, ranking: np.ndarray | None = None) -> dict:
        ranking = predicted if ranking is None else ranking
        on_query = predicted[user.query_positions]
        truth = user.query_ratings
        if self.data.feedback == "explicit" and predicts_ratings:
            error = {"mae": mae(truth, on_query, rating_range), "rmse": rmse(truth, on_query, rating_range)}
        else:
            error = {"mae": float("nan"), "rmse": float("nan")}
        ranked = rank_items(user.query.item_ids[:user.n_catalogue], ranking[:user.n_catalogue], k=20)
        return {
            "user_id": user.user_id,
            "n_support": len(user.query.support),
            "n_query": len(truth),
            "n_relevant": len(user.relevant),
            "n_candidates": user.n_catalogue,
            **error,
            "ndcg@3": ndcg_at_k(truth, on_query, 3),
            "ndcg@10": ndcg_at_k(truth, on_query, 10),
            "recall@20": catalogue_recall_at_k(ranked, user.relevant, 20),
            "ndcg@20": catalogue_ndcg_at_k(ranked, user.relevant, 20),
        }

    def describe(self) -> dict[str, Any]:
        """JSON-able summary of the split (for reports)."""
        tasks = self._tasks[self.k_values[0]]
        return {
            "protocol": "Q1",
            "k_values": list(self.k_values),
            "eval_min_interactions": self.eval_min_interactions,
            "fractions": list(self.fractions),
            "relevance_threshold": self.relevance_threshold,
            "feedback": self.data.feedback,
            "users": {"train": len(tasks.train), "val": len(tasks.val), "test": len(tasks.test)},
            "catalogue_items": int(len(self._catalogue)),
        }

    def __repr__(self) -> str:
        d = self.describe()
        return f"Q1Protocol(k_values={self.k_values}, users={d['users']}, catalogue={d['catalogue_items']})"
