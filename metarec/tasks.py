"""Users as meta-learning tasks: support / query splits, user-level splits and padding.

:class:`UserTasks` sorts and encodes the interactions once, splits users into train /
validation / test :class:`TaskSet` s and precomputes every user's support and query rows,
so building an :class:`Episode` batch is a handful of numpy gathers. Both splits are either
a rule (by time, or seeded random) or given: a mapping of set name to user ids, and the
support interactions of each user (support sizes may then differ from user to user). Users
that a filter leaves out are listed in ``UserTasks.dropped_users`` and counted in a warning.

Shapes are kept to a few buckets so compiled (XLA / jit) code is reused: the support is
always padded to ``support_size``; the query to the smallest of :func:`query_bucket`'s sizes
that fits the batch; the last partial batch is padded with fully-masked users.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, Union

import numpy as np
import pandas as pd

from metarec.encoding import FeatureEncoder
from metarec.interactions import InteractionData

SPLITS = ("time", "random")
#: The ``split`` of task sets whose support sets were given (``UserTasks(support=...)``).
GIVEN = "given"
#: Set names of a given user split (``UserTasks(user_split={...})``).
SET_NAMES = ("train", "val", "test")

#: What ``UserTasks(support=...)`` takes: (user_id, item_id) rows, or a boolean mask.
SupportSpec = Union[pd.DataFrame, pd.Series, np.ndarray, Sequence[bool]]


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
        given: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
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
        if given is not None:
            # Given support / query rows per user (split == "given"): nothing to draw.
            self._support, self._query = list(given[0]), list(given[1])
            return
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

    @property
    def support_sizes(self) -> np.ndarray:
        """Support rows per user (at most ``support_size``; fewer for short users and, with
        given support sets, whatever each user was given), int array ``[len]``."""
        return np.asarray([len(r) for r in self._support], dtype=np.int64)

    @property
    def query_sizes(self) -> np.ndarray:
        """Query rows per user, int array ``[len]``."""
        return np.asarray([len(r) for r in self._query], dtype=np.int64)

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
                (training-time augmentation); ignored for ``split="time"`` and
                ``"given"``, whose splits are fixed by definition.
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
            Default 10; with given ``support`` sets, the largest given support (the padded
            length; a smaller value than that is an error).
        query_size: cap on query rows per user (``None``: all the rest), the first in time
            order (``split="random"``: a seeded random subset).
        split: support / query split per user: ``"time"`` (the first K by (timestamp,
            item_id); needs timestamps) or ``"random"`` (a seeded random K). Default
            ``"time"``; leave it unset when passing ``support`` (the split is then ``"given"``).
        user_split: ``"time"`` (users ordered by first interaction, ties by user id: the
            earliest are train users, the latest test users - protocol Q1), ``"random"``
            (a seeded permutation), or a given split: a mapping of set name (``"train"``,
            ``"val"``, ``"test"``; a missing name is an empty set) to user ids, each set kept
            in the order given. Users of the data that no set names are left out and
            reported in ``dropped_users``.
        fractions: (train, validation, test) shares of the users; must sum to 1. Counts are
            ``round(f * n)`` for train and validation, the rest for test. Not used with a
            given ``user_split``.
        min_interactions: users with fewer interactions are left out of every set
            (default ``support_size + 1``, so every user has a query; with given ``support``
            sets, no count floor: users whose query is empty are left out instead).
        max_interactions: users with more interactions are left out of every set (as in
            MeLU's preprocessing); ``None`` keeps all.
        eval_min_interactions: validation / test users need at least this many (Q1: 30).
        encoder: a fitted :class:`FeatureEncoder`; fit on ``data`` when ``None``. Fitting on
            all users is leak-free: it reads ids and features, never ratings.
        seed: seeds the random user split and the random support / query split.
        support: given support sets: a DataFrame of ``(user_id, item_id)`` rows of ``data``
            (other columns are ignored), or a boolean mask over ``data.interactions``' rows
            (by position). Each user's support is those of their interactions, in (timestamp,
            item_id) order; their query is the rest (capped by ``query_size``). Sizes may
            differ between users, and a user with no support row has an empty support (the
            learners then predict with the meta-learned initialisation, unadapted).
        query: given query sets, as ``(user_id, item_id)`` rows of ``data`` disjoint from
            ``support`` (only with ``support``); a user's interactions in neither are unused.

    Attributes ``train``, ``val`` and ``test`` are :class:`TaskSet` s. The user split comes
    first (over all users), the interaction filters after, so a filter never moves a user
    from one set to another. ``dropped_users`` is a DataFrame (``user_id``, ``set``,
    ``reason``) of the users of the data in no task set; when it is not empty, a
    ``UserWarning`` says how many were dropped and why. :meth:`summary` shows the counts.

    Raises:
        ValueError: on a bad argument, a given user split naming users not in the data or a
            user twice, or given support / query rows that are not interactions of ``data``.
    """

    def __init__(
        self,
        data: InteractionData,
        support_size: int | None = None,
        query_size: int | None = None,
        split: str | None = None,
        user_split: str | Mapping[str, Iterable] = "time",
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        min_interactions: int | None = None,
        max_interactions: int | None = None,
        eval_min_interactions: int | None = None,
        encoder: FeatureEncoder | None = None,
        seed: int = 0,
        support: SupportSpec | None = None,
        query: pd.DataFrame | None = None,
    ) -> None:
        if not isinstance(data, InteractionData):
            raise ValueError(f"UserTasks needs an InteractionData, got {type(data).__name__}")
        given = support is not None
        if query is not None and not given:
            raise ValueError("query= needs support= (the given support sets); got query alone.")
        if given and split is not None:
            raise ValueError(f"split and support= are alternatives: with given support sets the "
                             f"split is {GIVEN!r}; got split={split!r}.")
        if support_size is not None:
            _check_positive("support_size", support_size)
        if query_size is not None:
            _check_positive("query_size", query_size)
        split = GIVEN if given else ("time" if split is None else split)
        if not given and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        by_rule = isinstance(user_split, str)
        if (by_rule and user_split not in SPLITS) or not (by_rule or isinstance(user_split, Mapping)):
            raise ValueError(f"user_split must be one of {SPLITS} or a mapping of set name to "
                             f"user ids; got {user_split!r}.")
        timed = [f"split={split!r}"] if split == "time" else []
        timed += [f"user_split={user_split!r}"] if by_rule and user_split == "time" else []
        if timed and not data.has_timestamps:
            raise ValueError(f"{', '.join(timed)} need a 'timestamp' column; this data has none "
                             "(use split='random', user_split='random')")
        fractions = tuple(float(f) for f in fractions)
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be three non-negative shares summing to 1, got {fractions!r}")
        if min_interactions is None:
            min_interactions = 1 if given else (support_size or 10) + 1
        _check_positive("min_interactions", min_interactions)
        if max_interactions is not None:
            _check_positive("max_interactions", max_interactions)
        if eval_min_interactions is not None:
            _check_positive("eval_min_interactions", eval_min_interactions)

        self.data = data
        self.encoder = encoder if encoder is not None else FeatureEncoder.fit(data)
        self.split = split
        self.user_split = user_split if by_rule else GIVEN
        self.fractions = fractions
        self.seed = seed

        frame, item_idx, ratings, user_ids, starts, counts, first_ts, order = self._sort(data)
        if by_rule:
            ranked = self._order_users(user_ids, first_ts, user_split, seed)
            n = len(ranked)
            n_train = int(round(fractions[0] * n))
            n_val = min(int(round(fractions[1] * n)), n - n_train)
            groups = {"train": ranked[:n_train], "val": ranked[n_train:n_train + n_val],
                      "test": ranked[n_train + n_val:]}
        else:
            groups = _given_groups(user_split, user_ids)
        is_support = is_query = None
        if given:
            is_support = _given_rows("support", support, frame, order, len(data.interactions))
            if query is not None:
                if not isinstance(query, pd.DataFrame):
                    raise ValueError(f"query must be a DataFrame of (user_id, item_id) rows; "
                                     f"got {type(query).__name__}.")
                is_query = _given_rows("query", query, frame, order, len(data.interactions))
                both = is_support & is_query
                if both.any():
                    raise ValueError(f"support and query share {int(both.sum())} interactions; got "
                                     f"{_few(list(zip(frame.user_id[both], frame.item_id[both])))}.")
            else:
                is_query = ~is_support
        self.support_size = support_size if support_size is not None else 10

        dropped: list[tuple[object, object, str]] = []
        placed = np.zeros(len(user_ids), dtype=bool)
        for users in groups.values():
            placed[users] = True
        dropped += [(user_ids[u], None, "in no set of user_split") for u in np.flatnonzero(~placed)]

        eval_floor = max(min_interactions, eval_min_interactions or 0)
        kept: dict[str, tuple[np.ndarray, list, list | None]] = {}
        for name, users in groups.items():
            keep = []
            for u in users:
                reason = None
                if counts[u] < min_interactions:
                    reason = f"with fewer than min_interactions={min_interactions} interactions"
                elif name != "train" and counts[u] < eval_floor:
                    reason = f"with fewer than eval_min_interactions={eval_min_interactions} interactions"
                elif max_interactions is not None and counts[u] > max_interactions:
                    reason = f"with more than max_interactions={max_interactions} interactions"
                elif given and not is_query[starts[u]:starts[u] + counts[u]].any():
                    reason = "with no query interactions"
                if reason is None:
                    keep.append(u)
                else:
                    dropped.append((user_ids[u], name, reason))
            keep = np.asarray(keep, dtype=np.int64)
            rows = [np.arange(starts[u], starts[u] + counts[u]) for u in keep]
            pairs = None
            if given:
                pairs = ([r[is_support[r]] for r in rows],
                         [r[is_query[r]][:query_size] for r in rows])
            kept[name] = (keep, rows, pairs)

        if given:
            longest = max((len(s) for _, _, p in kept.values() for s in p[0]), default=0)
            if support_size is None:
                self.support_size = max(longest, 1)
            elif longest > support_size:
                user, size = next((user_ids[u], len(s)) for keep, _, p in kept.values()
                                  for u, s in zip(keep, p[0]) if len(s) > support_size)
                raise ValueError(f"support_size={support_size} is smaller than the given support "
                                 f"of user {user!r}; got {size} rows (leave support_size unset to "
                                 "pad to the largest given support).")
        sets = {name: TaskSet(name, self.encoder, frame, item_idx, ratings, user_ids[keep], rows,
                              self.support_size, query_size, split, seed, user_frame=data.users,
                              given=pairs)
                for name, (keep, rows, pairs) in kept.items()}
        self.train: TaskSet = sets["train"]
        self.val: TaskSet = sets["val"]
        self.test: TaskSet = sets["test"]
        self.num_users = len(user_ids)
        self.dropped_users = pd.DataFrame(dropped, columns=["user_id", "set", "reason"])
        if len(self.dropped_users):
            counts = self.dropped_users["reason"].value_counts(sort=False)
            warnings.warn(f"UserTasks dropped {len(self.dropped_users)} of {self.num_users} users: "
                          + ", ".join(f"{n} {reason}" for reason, n in counts.items())
                          + "; UserTasks.dropped_users lists them.", UserWarning, stacklevel=2)

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
        return (frame, item_idx, ratings, np.asarray(user_ids, dtype=object), starts, counts,
                first_ts, order)

    @staticmethod
    def _order_users(user_ids: np.ndarray, first_ts: np.ndarray, user_split: str, seed: int) -> np.ndarray:
        if user_split == "random":
            return np.random.default_rng(seed).permutation(len(user_ids))
        # user_ids come sorted from factorize(sort=True): position is the id tie-breaker.
        return np.lexsort((np.arange(len(user_ids)), first_ts))

    def summary(self) -> str:
        """A few lines on the sets: users, support / query sizes, and dropped users by reason.

        Returns:
            The text (also what ``print(tasks.summary())`` shows).
        """
        lines = [f"UserTasks over {self.num_users} users: split={self.split!r}, "
                 f"user_split={self.user_split!r}, support_size={self.support_size}"]
        for tset in (self.train, self.val, self.test):
            line = f"  {tset.name:<5} {len(tset):>6} users"
            if len(tset):
                s, q = tset.support_sizes, tset.query_sizes
                line += (f", support {s.min()}-{s.max()} (mean {s.mean():.1f})"
                         f", query {q.min()}-{q.max()} (mean {q.mean():.1f})")
                if not s.min():
                    line += f", {int((s == 0).sum())} with an empty support"
            lines.append(line)
        if len(self.dropped_users):
            lines.append(f"  dropped {len(self.dropped_users)} users:")
            counts = self.dropped_users["reason"].value_counts(sort=False)
            lines += [f"    {n:>6} {reason}" for reason, n in counts.items()]
        else:
            lines.append("  dropped no users")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"UserTasks(train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
                f"dropped={len(self.dropped_users)}, support_size={self.support_size}, "
                f"split={self.split!r}, user_split={self.user_split!r})")


def _few(values: Sequence, n: int = 5) -> str:
    """The first ``n`` values, and how many there are in all when more."""
    values = list(values)
    shown = repr(values[:n])
    return shown if len(values) <= n else f"{shown[:-1]}, ...] ({len(values)} in all)"


def _given_groups(user_split: Mapping[str, Iterable], user_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Positions (into the sorted ``user_ids``) of the users of each set of a given split."""
    unknown_sets = [name for name in user_split if name not in SET_NAMES]
    if unknown_sets:
        raise ValueError(f"user_split's sets must be among {SET_NAMES}; got {unknown_sets!r}.")
    index = pd.Index(user_ids)
    groups, owner = {}, {}
    for name in SET_NAMES:
        ids = user_split.get(name, ())
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise ValueError(f"user_split[{name!r}] must be a collection of user ids; got {ids!r}.")
        ids = list(ids)
        positions = index.get_indexer(pd.Index(ids, dtype=object)) if ids else np.zeros(0, np.int64)
        missing = [i for i, p in zip(ids, positions) if p < 0]
        if missing:
            raise ValueError(f"user_split[{name!r}] names {len(missing)} users that are not in the "
                             f"data; got {_few(missing)}.")
        repeated = pd.Index(positions).duplicated()
        if repeated.any():
            raise ValueError(f"user_split[{name!r}] names users twice; got "
                             f"{_few([i for i, r in zip(ids, repeated) if r])}.")
        both = [(i, owner[p]) for i, p in zip(ids, positions) if p in owner]
        if both:
            raise ValueError(f"user_split's sets overlap: users in {both[0][1]!r} and {name!r}; "
                             f"got {_few([i for i, _ in both])}.")
        owner.update((p, name) for p in positions)
        groups[name] = np.asarray(positions, dtype=np.int64)
    return groups


def _given_rows(what: str, given, frame: pd.DataFrame, order: np.ndarray, n_rows: int) -> np.ndarray:
    """A boolean mask over the sorted ``frame`` of the rows ``given`` names.

    ``given``: a DataFrame of (user_id, item_id) rows, or (support only) a boolean mask over
    the data's interaction rows by position; ``order`` maps sorted rows to those positions.
    """
    if isinstance(given, pd.DataFrame):
        missing_cols = {"user_id", "item_id"} - set(given.columns)
        if missing_cols:
            raise ValueError(f"{what} must have 'user_id' and 'item_id' columns; got columns "
                             f"{list(given.columns)}.")
        pairs = pd.MultiIndex.from_arrays([frame["user_id"], frame["item_id"]])
        wanted = pd.MultiIndex.from_arrays([given["user_id"].to_numpy(dtype=object),
                                            given["item_id"].to_numpy(dtype=object)])
        position = pairs.get_indexer(wanted)
        if (position < 0).any():
            bad = [(u, i) for (u, i), p in zip(wanted, position) if p < 0]
            raise ValueError(f"{what} has {len(bad)} (user_id, item_id) rows that are not "
                             f"interactions of the data; got {_few(bad)}.")
        mask = np.zeros(len(frame), dtype=bool)
        mask[position] = True
        return mask
    if what != "support":
        raise ValueError(f"{what} must be a DataFrame of (user_id, item_id) rows; got "
                         f"{type(given).__name__}.")
    values = np.asarray(given)
    if values.dtype != bool or values.shape != (n_rows,):
        raise ValueError(f"support must be a DataFrame of (user_id, item_id) rows or a boolean "
                         f"mask of the {n_rows} interaction rows; got {values.dtype} of shape "
                         f"{values.shape}.")
    return values[order]
