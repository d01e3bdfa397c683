"""Tasks given directly as arrays, for meta-learning problems that are not user-item data.

``UserTasks`` builds episodes from interactions; ``ArrayTasks`` takes them ready-made: one
support and one query set per task, as dicts of arrays with a leading ``[tasks, examples]``
shape. It offers the ``TaskSet`` interface that ``MetaLearner.fit`` and ``evaluate`` use.
"""

import numpy as np

from metarec.tasks import Episode


class ArrayTasks:
    """A set of tasks held as arrays.

    Args:
        support_x, query_x: dicts ``{name: array [tasks, n, ...]}`` of model inputs.
        support_y, query_y: targets ``[tasks, n]``.
        support_mask, query_mask: optional ``[tasks, n]`` masks (1 = real example).
    """

    encoder = None

    def __init__(self, support_x, support_y, query_x, query_y, support_mask=None, query_mask=None):
        self.support_x = {k: np.asarray(v) for k, v in support_x.items()}
        self.query_x = {k: np.asarray(v) for k, v in query_x.items()}
        self.support_y = np.asarray(support_y, np.float32)
        self.query_y = np.asarray(query_y, np.float32)
        n = len(self.support_y)
        self.support_mask = np.ones_like(self.support_y) if support_mask is None else np.asarray(support_mask, np.float32)
        self.query_mask = np.ones_like(self.query_y) if query_mask is None else np.asarray(query_mask, np.float32)
        for name, arr in [("query_y", self.query_y), ("support_mask", self.support_mask),
                          ("query_mask", self.query_mask)] + [
                (f"support_x[{k!r}]", v) for k, v in self.support_x.items()] + [
                (f"query_x[{k!r}]", v) for k, v in self.query_x.items()]:
            if len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} tasks; support_y has {n}.")
        if self.support_y.ndim != 2 or self.query_y.ndim != 2:
            raise ValueError(
                f"targets must be [tasks, examples]; got shapes {self.support_y.shape} and "
                f"{self.query_y.shape}."
            )
        if not (np.all(np.isfinite(self.support_y)) and np.all(np.isfinite(self.query_y))):
            raise ValueError("targets must be finite; got NaN or infinite values.")

    def __len__(self):
        return len(self.support_y)

    def num_batches(self, batch_size):
        return -(-len(self) // batch_size)

    def episode_for(self, indices, batch_size=None):
        """The tasks at ``indices``, padded with fully-masked tasks up to ``batch_size``."""
        indices = np.asarray(indices, np.int64)
        size = len(indices) if batch_size is None else batch_size

        def take(arr, zero_mask=False):
            out = np.zeros((size,) + arr.shape[1:], arr.dtype)
            out[: len(indices)] = arr[indices]
            return out

        return Episode(
            {k: take(v) for k, v in self.support_x.items()}, take(self.support_y),
            take(self.support_mask),
            {k: take(v) for k, v in self.query_x.items()}, take(self.query_y),
            take(self.query_mask),
        )

    def episodes(self, batch_size, shuffle=False, seed=None, max_query=None, resample=False):
        """Batches of ``batch_size`` tasks covering the set once (``max_query`` and
        ``resample`` are accepted for interface compatibility and ignored)."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self.episode_for(order[start:start + batch_size], batch_size)
