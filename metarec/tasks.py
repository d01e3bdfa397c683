"""Users as meta-learning tasks: support / query splits, user-level splits and padding.

:class:`UserTasks` sorts and encodes the interactions once, splits users into train /
validation / test :class:`TaskSet` s and precomputes every user's support and query rows,
so building an :class:`Episode` batch is a handful of numpy gathers.

Shapes are kept to a few buckets so compiled (XLA / jit) code is reused: the support is
always padded to ``support_size``; the query to the smallest of :func:`query_bucket`'s sizes
that fits the batch; the last partial batch is padded with fully-masked users.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from metarec.encoding import FeatureEncoder
from metarec.interactions import InteractionData

SPLITS = ("time", "random")


class Episode(NamedTuple):
    """A padded batch of user tasks.

    ``support`` / ``query`` are model-input dicts with leading shape ``[users, n]`` (item
    inputs plus each user's own features broadcast over ``n``); ``*_y`` and ``*_mask`` are
    float32 ``[users, n]``. Padded rows and padded users have mask 0.
    """

    support: dict[str, np.ndarray]
    support_y: np.ndarray
    support_mask: np.ndarray
    query: dict[str, np.ndarray]
    query_y: np.ndarray
    query_mask: np.ndarray


def query_bucket(n: int) -> int:
    """Padded query length for ``n`` rows: 8, 16, ..., 1024, then multiples of 1024."""
    if n < 0:
        raise ValueError(f"query length must be >= 0, got {n!r}")
    if n <= 8:
        return 8
    if n <= 1024:
        return 1 << int(np.ceil(np.log2(n)))
    return int(np.ceil(n / 1024)) * 1024


def _as_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


class TaskSet:
    """The tasks (users) of one user-level split; built by :class:`UserTasks`.

    Per user ``i`` (0 <= i < len), rows are positions into shared, sorted interaction
    arrays; ``support_frame(i)`` / ``query_frame(i)`` give the raw pandas rows.
    """

    def __init__(
        self,
        name: str,
        encoder: FeatureEncoder,
        frame: pd.DataFrame,
        item_idx: np.ndarray,
        ratings: np.ndarray,
        user_ids: np.ndarray,
        rows: list[np.ndarray],
        support_size: int,
        query_size: int | None,
        split: str,
        seed: int,
        user_frame: pd.DataFrame | None = None,
    ) -> None:
        self.name = name
        self.encoder = encoder
        self.support_size = support_size
        self.query_size = query_size
        self.split = split
        self._frame = frame
        self._item_idx = item_idx
        self._ratings = ratings
        self.user_ids = np.asarray(user_ids, dtype=object)
        self.user_index = encoder.user_index(self.user_ids)
        self._user_frame = user_frame
        self._user_inputs = self._encode_users(user_frame)
        self._rows = rows
        # The fixed split: time order, or one seeded draw per set (resample=True redraws).
        rng = np.random.default_rng([seed, SPLITS.index(split), zlib.crc32(name.encode())])
        pairs = [self._split_rows(r, rng) for r in rows]
        self._support = [p[0] for p in pairs]
        self._query = [p[1] for p in pairs]

    def _encode_users(self, user_frame: pd.DataFrame | None) -> dict[str, np.ndarray]:
        """Every user's feature inputs ``[len, ...]``.

        Users the encoder knows read its feature tables. Users it does not know (new users in
        logged data, when a kept encoder is retrained on them) would all read the
        out-of-vocabulary row; when ``user_frame`` has their features, those are encoded
        instead, exactly as a request's features are at serving time.
        """
        inputs = self.encoder.user_inputs_from_index(self.user_index)
        if user_frame is None or not len(user_frame) or not inputs:
            return inputs
        new = np.flatnonzero((self.user_index == 0) & pd.Index(self.user_ids).isin(user_frame.index))
        if len(new):
            rows = user_frame.loc[self.user_ids[new]].reset_index(drop=True)
            encoded = self.encoder.user_inputs_from_features(rows)
            for name, values in encoded.items():
                inputs[name][new] = values
        return inputs

    def user_features(self, i: int) -> dict:
        """User ``i``'s raw features (from the data's user frame; ``{}`` without one), as
        ``adapt(..., user_features)`` takes them."""
        frame = self._user_frame
        if frame is None or self.user_ids[i] not in frame.index:
            return {}
        return frame.loc[self.user_ids[i]].to_dict()

    # ------------------------------------------------------------------ splitting
    def _split_rows(self, rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        k = self.support_size
        if self.split == "random":
            # Sorting the drawn positions keeps both halves in time (or id) order.
            picked = rng.permutation(len(rows))
            support = rows[np.sort(picked[:k])]
            rest = picked[k:]
            if self.query_size is not None and len(rest) > self.query_size:
                rest = rest[: self.query_size]
            return support, rows[np.sort(rest)]
        query = rows[k:]
        if self.query_size is not None:
            query = query[: self.query_size]
        return rows[:k], query

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"TaskSet({self.name!r}, {len(self)} users, support_size={self.support_size})"

    @property
    def num_interactions(self) -> np.ndarray:
        """Interactions per user (support + query + unused), int array ``[len]``."""
        return np.asarray([len(r) for r in self._rows], dtype=np.int64)

    def support_frame(self, i: int) -> pd.DataFrame:
        """Raw interaction rows of user ``i``'s support set, in support order."""
        return self._frame.iloc[self._support[i]].reset_index(drop=True)

    def query_frame(self, i: int) -> pd.DataFrame:
        """Raw interaction rows of user ``i``'s query set."""
        return self._frame.iloc[self._query[i]].reset_index(drop=True)

    def frame(self) -> pd.DataFrame:
        """Every interaction of this set's users (e.g. to train a non-adaptive baseline)."""
        if not self._rows:
            return self._frame.iloc[:0].reset_index(drop=True)
        return self._frame.iloc[np.concatenate(self._rows)].reset_index(drop=True)

    def num_batches(self, batch_size: int) -> int:
        """Batches that :meth:`episodes` yields for ``batch_size``."""
        _check_positive("batch_size", batch_size)
        return -(-len(self) // batch_size)

    # ------------------------------------------------------------------ episodes
    def episodes(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        max_query: int | None = None,
        resample: bool = False,
    ) -> Iterator[Episode]:
        """Yield padded :class:`Episode` batches of ``batch_size`` users covering the set once.

        Args:
            shuffle: visit users in a seeded random order.
            seed: seeds shuffling, query subsampling and resampling (``None``: fresh entropy).
            max_query: keep at most this many query rows per user (a seeded random subset).
            resample: for ``split="random"``, draw a fresh support / query split per user
                (training-time augmentation); ignored for ``split="time"``, whose split is
                fixed by definition.
        """
        _check_positive("batch_size", batch_size)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self.episode_for(order[start:start + batch_size], batch_size=batch_size,
                                   max_query=max_query, seed=rng, resample=resample)

    def episode_for(
        self,
        indices: Sequence[int] | np.ndarray,
        batch_size: int | None = None,
        max_query: int | None = None,
        seed: int | np.random.Generator | None = None,
        resample: bool = False,
    ) -> Episode:
        """One :class:`Episode` for the users at ``indices`` (positions in this set).

        With ``batch_size`` larger than ``len(indices)`` the batch is padded with
        fully-masked users, so every batch of an epoch has the same leading shape.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        size = len(indices) if batch_size is None else int(batch_size)
        if len(indices) > size:
            raise ValueError(f"{len(indices)} users do not fit batch_size={size}")
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise ValueError(f"user positions must be in [0, {len(self)}), got range "
                             f"[{indices.min()}, {indices.max()}]")
        if max_query is not None:
            _check_positive("max_query", max_query)
        rng = _as_rng(seed)
        supports, queries = [], []
        for i in indices:
            if resample and self.split == "random":
                support, query = self._split_rows(self._rows[i], rng)
            else:
                support, query = self._support[i], self._query[i]
            if max_query is not None and len(query) > max_query:
                query = query[np.sort(rng.choice(len(query), max_query, replace=False))]
            supports.append(support)
            queries.append(query)
        q_len = query_bucket(max((len(q) for q in queries), default=0))
        # Padded users read the OOV user row.
        oov = self.encoder.user_inputs_from_index(np.zeros(size - len(indices), dtype=np.int32))
        user_inputs = {k: np.concatenate([v[indices], oov[k]]) for k, v in self._user_inputs.items()}
        s_inputs, s_y, s_mask = self._pad(supports, size, self.support_size, user_inputs)
        q_inputs, q_y, q_mask = self._pad(queries, size, q_len, user_inputs)
        return Episode(s_inputs, s_y, s_mask, q_inputs, q_y, q_mask)

    def _pad(self, row_sets: list[np.ndarray], size: int, length: int, user_inputs):
        item_idx = np.zeros((size, length), dtype=np.int32)
        y = np.zeros((size, length), dtype=np.float32)
        mask = np.zeros((size, length), dtype=np.float32)
        for b, rows in enumerate(row_sets):
            n = len(rows)
            item_idx[b, :n] = self._item_idx[rows]
            y[b, :n] = self._ratings[rows]
            mask[b, :n] = 1.0
        inputs = self.encoder.item_inputs(item_idx)
        for name, values in user_inputs.items():
            # Each user's features repeat over their n interactions: [B, ...] → [B, n, ...].
            expanded = np.expand_dims(values, 1)
            inputs[name] = np.ascontiguousarray(
                np.broadcast_to(expanded, (size, length) + values.shape[1:]))
        return inputs, y, mask


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class UserTasks:
    """Turn :class:`InteractionData` into train / validation / test task sets.

    Args:
        data: the interactions.
        support_size: K, interactions per support set (padded when a user has fewer).
        query_size: cap on query rows per user (``None``: all the rest).
        split: support / query split per user: ``"time"`` (the first K by (timestamp,
            item_id); needs timestamps) or ``"random"`` (a seeded random K).
        user_split: ``"time"`` (users ordered by first interaction, ties by user id: the
            earliest are train users, the latest test users - protocol Q1) or ``"random"``
            (a seeded permutation).
        fractions: (train, validation, test) shares of the users; must sum to 1. Counts are
            ``round(f * n)`` for train and validation, the rest for test.
        min_interactions: users with fewer interactions are left out of every set
            (default ``support_size + 1``, so every user has a query).
        max_interactions: users with more interactions are left out of every set (as in
            MeLU's preprocessing); ``None`` keeps all.
        eval_min_interactions: validation / test users need at least this many (Q1: 30).
        encoder: a fitted :class:`FeatureEncoder`; fit on ``data`` when ``None``. Fitting on
            all users is leak-free: it reads ids and features, never ratings.
        seed: seeds the random user split and the random support / query split.

    Attributes ``train``, ``val`` and ``test`` are :class:`TaskSet` s. The user split comes
    first (over all users), the interaction filters after, so a filter never moves a user
    from one set to another.
    """

    def __init__(
        self,
        data: InteractionData,
        support_size: int = 10,
        query_size: int | None = None,
        split: str = "time",
        user_split: str = "time",
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        min_interactions: int | None = None,
        max_interactions: int | None = None,
        eval_min_interactions: int | None = None,
        encoder: FeatureEncoder | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(data, InteractionData):
            raise ValueError(f"UserTasks needs an InteractionData, got {type(data).__name__}")
        _check_positive("support_size", support_size)
        if query_size is not None:
            _check_positive("query_size", query_size)
        for name, value in (("split", split), ("user_split", user_split)):
            if value not in SPLITS:
                raise ValueError(f"{name} must be one of {SPLITS}, got {value!r}")
        if "time" in (split, user_split) and not data.has_timestamps:
            raise ValueError(f"split={split!r}, user_split={user_split!r} need a 'timestamp' column; "
                             "this data has none (use split='random', user_split='random')")
        fractions = tuple(float(f) for f in fractions)
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be three non-negative shares summing to 1, got {fractions!r}")
        min_interactions = support_size + 1 if min_interactions is None else min_interactions
        _check_positive("min_interactions", min_interactions)
        if max_interactions is not None:
            _check_positive("max_interactions", max_interactions)
        if eval_min_interactions is not None:
            _check_positive("eval_min_interactions", eval_min_interactions)

        self.data = data
        self.encoder = encoder if encoder is not None else FeatureEncoder.fit(data)
        self.support_size = support_size
        self.split = split
        self.user_split = user_split
        self.fractions = fractions
        self.seed = seed

        frame, item_idx, ratings, user_ids, starts, counts, first_ts = self._sort(data)
        order = self._order_users(user_ids, first_ts, user_split, seed)
        n = len(order)
        n_train = int(round(fractions[0] * n))
        n_val = min(int(round(fractions[1] * n)), n - n_train)
        groups = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
                  "test": order[n_train + n_val:]}

        def keep(users: np.ndarray, floor: int) -> np.ndarray:
            ok = counts[users] >= floor
            if max_interactions is not None:
                ok &= counts[users] <= max_interactions
            return users[ok]

        eval_floor = max(min_interactions, eval_min_interactions or 0)
        sets = {}
        for name, users in groups.items():
            users = keep(users, min_interactions if name == "train" else eval_floor)
            rows = [np.arange(starts[u], starts[u] + counts[u]) for u in users]
            sets[name] = TaskSet(name, self.encoder, frame, item_idx, ratings, user_ids[users], rows,
                                 support_size, query_size, split, seed, user_frame=data.users)
        self.train: TaskSet = sets["train"]
        self.val: TaskSet = sets["val"]
        self.test: TaskSet = sets["test"]

    def _sort(self, data: InteractionData):
        """Sort interactions by (user, timestamp, item id) once and encode them."""
        frame = data.interactions
        user_codes, user_ids = pd.factorize(frame["user_id"], sort=True)
        item_codes, _ = pd.factorize(frame["item_id"], sort=True)
        if data.has_timestamps:
            ts = frame["timestamp"].to_numpy()
        else:
            ts = np.zeros(len(frame), dtype=np.int64)
        order = np.lexsort((item_codes, ts, user_codes))
        frame = frame.iloc[order].reset_index(drop=True)
        item_idx, ratings = self.encoder.encode_interactions(frame)
        counts = np.bincount(user_codes, minlength=len(user_ids))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        first_ts = ts[order][starts]
        return frame, item_idx, ratings, np.asarray(user_ids, dtype=object), starts, counts, first_ts

    @staticmethod
    def _order_users(user_ids: np.ndarray, first_ts: np.ndarray, user_split: str, seed: int) -> np.ndarray:
        if user_split == "random":
            return np.random.default_rng(seed).permutation(len(user_ids))
        # user_ids come sorted from factorize(sort=True): position is the id tie-breaker.
        return np.lexsort((np.arange(len(user_ids)), first_ts))

    def __repr__(self) -> str:
        return (f"UserTasks(train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
                f"support_size={self.support_size}, split={self.split!r}, user_split={self.user_split!r})")
