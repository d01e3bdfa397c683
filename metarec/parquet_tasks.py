"""Training tasks read from Parquet out of core: the users of a table too large for memory.

:class:`ParquetTasks` offers the task-set interface that ``MetaLearner.fit`` and ``evaluate``
use (``encoder``, ``len``, ``num_batches``, ``episodes``), but holds no table: each pass reads
the Parquet file or folder through ``pyarrow.dataset`` in chunks of whole users
(:func:`metarec.user_chunks.iter_user_chunks`), builds a :class:`~metarec.tasks.TaskSet` for
the chunk and yields its episodes. Memory is bounded by ``chunk_users`` users, whatever the
number of users in the files.

Shuffling is a shuffle buffer: users are visited in a seeded random order inside each chunk,
and chunks in file order (sort or hash-partition the files by user when writing them so that
a chunk is a fair sample). Without shuffling, the episodes are exactly those of a
``UserTasks`` set holding the same users in user-id order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pandas as pd

from metarec.batch_scoring import UserFeatureLookup
from metarec.encoding import FeatureEncoder
from metarec.tasks import SPLITS, Episode, TaskSet, _check_positive
from metarec.user_chunks import iter_user_chunks, open_dataset, user_bounds


class ParquetTasks:
    """Users of a Parquet file or folder as meta-learning tasks, read a chunk at a time.

    Args:
        path: a Parquet file or folder (or a CSV file) with ``user_id``, ``item_id``,
            ``rating`` and, for ``split="time"``, ``timestamp``. Input sorted by user is read in
            one pass per epoch; other input is hash-partitioned by user first, every epoch.
        encoder: a fitted :class:`FeatureEncoder` (e.g. fitted on the catalogue, the user
            features and a sample of interactions). Users it does not know read their features
            from ``user_features``.
        support_size: K, support interactions per user (padded when a user has fewer).
        query_size: cap on query rows per user (None: all the rest).
        split: ``"random"`` (a seeded random K; ``fit`` redraws it every epoch) or ``"time"``
            (the first K by timestamp, then item id).
        min_interactions: users with fewer interactions are skipped (default
            ``support_size + 1``, so that every user has a query).
        user_features: optional DataFrame indexed by ``user_id``: features of users the encoder
            does not know, found per chunk with one vectorised join.
        chunk_users: users read at a time (rounded up to a multiple of the batch size).
        seed: seeds the fixed support / query split.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        encoder: FeatureEncoder,
        support_size: int = 10,
        query_size: int | None = None,
        split: str = "random",
        min_interactions: int | None = None,
        user_features: pd.DataFrame | None = None,
        chunk_users: int = 8192,
        seed: int = 0,
    ) -> None:
        if not isinstance(encoder, FeatureEncoder):
            raise ValueError(f"encoder must be a fitted FeatureEncoder; got {type(encoder).__name__}.")
        _check_positive("support_size", support_size)
        _check_positive("chunk_users", chunk_users)
        if query_size is not None:
            _check_positive("query_size", query_size)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
        self.min_interactions = support_size + 1 if min_interactions is None else min_interactions
        _check_positive("min_interactions", self.min_interactions)
        self.path = path
        self.encoder = encoder
        self.support_size = support_size
        self.query_size = query_size
        self.split = split
        self.chunk_users = chunk_users
        self.seed = seed
        self.name = "train"
        names = open_dataset(path).schema.names
        self.columns = ["user_id", "item_id", "rating"] + (["timestamp"] if "timestamp" in names else [])
        missing = set(self.columns) - set(names)
        if missing:
            raise ValueError(f"{str(path)!r} lacks columns {sorted(missing)}; got {names}.")
        if split == "time" and "timestamp" not in names:
            raise ValueError(f"split='time' needs a 'timestamp' column; {str(path)!r} has {names} "
                             "(use split='random').")
        self._features = None if user_features is None else UserFeatureLookup(user_features)
        self._len = self._count_users()

    def _count_users(self) -> int:
        """Users with at least ``min_interactions`` rows (one pass over ``user_id`` only)."""
        n = 0
        for chunk in iter_user_chunks(self.path, 1 << 16, ["user_id"]):
            _, counts = user_bounds(chunk["user_id"].to_numpy())
            n += int((counts >= self.min_interactions).sum())
        return n

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"ParquetTasks({str(self.path)!r}, {len(self)} users, support_size={self.support_size})"

    def num_batches(self, batch_size: int) -> int:
        """Batches that :meth:`episodes` yields for ``batch_size``."""
        _check_positive("batch_size", batch_size)
        return -(-len(self) // batch_size)

    def frame(self) -> pd.DataFrame:
        """Every interaction (``item_id``, ``rating``), read into memory.

        ``fit`` reads it only to check implicit labels when no objective is given, and to count
        items for a ``CatalogueObjective`` whose sampler is not fitted yet (fit the sampler
        beforehand to avoid this read on a large table).
        """
        return open_dataset(self.path).to_table(columns=["item_id", "rating"]).to_pandas()

    def episodes(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        max_query: int | None = None,
        resample: bool = False,
    ) -> Iterator[Episode]:
        """Padded batches of ``batch_size`` users covering every user once, as
        :meth:`TaskSet.episodes` yields them (only the last batch is partial).

        Args:
            batch_size: users per batch.
            shuffle: visit users in a seeded random order inside each chunk.
            seed: seeds shuffling, query subsampling and resampling.
            max_query: keep at most this many query rows per user.
            resample: for ``split="random"``, draw a fresh support / query split per user.
        """
        _check_positive("batch_size", batch_size)
        rng = np.random.default_rng(seed)
        per_read = -(-self.chunk_users // batch_size) * batch_size
        carried = None  # users of the last chunk short of a full batch, read with the next
        for chunk in iter_user_chunks(self.path, per_read, self.columns):
            if carried is not None:
                chunk = pd.concat([carried, chunk], ignore_index=True)
            tasks = self._task_set(chunk)
            order = rng.permutation(len(tasks)) if shuffle else np.arange(len(tasks))
            full = len(order) // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield tasks.episode_for(order[start:start + batch_size], batch_size=batch_size,
                                        max_query=max_query, seed=rng, resample=resample)
            rest = tasks.user_ids[order[full:]]
            carried = chunk[chunk["user_id"].isin(rest)] if len(rest) else None
        if carried is not None and len(carried):
            tasks = self._task_set(carried)
            yield tasks.episode_for(np.arange(len(tasks)), batch_size=batch_size,
                                    max_query=max_query, seed=rng, resample=resample)

    def _task_set(self, chunk: pd.DataFrame) -> TaskSet:
        """One chunk's users (those with ``min_interactions``) as a :class:`TaskSet`."""
        if "timestamp" in chunk:
            chunk = chunk.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
        else:
            chunk = chunk.sort_values(["user_id", "item_id"], kind="stable")
        chunk = chunk.reset_index(drop=True)
        starts, counts = user_bounds(chunk["user_id"].to_numpy())
        keep = counts >= self.min_interactions
        user_ids = chunk["user_id"].to_numpy()[starts[keep]]
        rows = [np.arange(a, a + n) for a, n in zip(starts[keep], counts[keep])]
        item_idx, ratings = self.encoder.encode_interactions(chunk)
        user_frame = None
        if self._features is not None:
            positions = self._features.frame.index.get_indexer(user_ids)
            user_frame = self._features.frame.iloc[positions[positions >= 0]]
        return TaskSet(self.name, self.encoder, chunk, item_idx, ratings, user_ids, rows,
                       self.support_size, self.query_size, self.split, self.seed,
                       user_frame=user_frame)
