"""Negative items for catalogue-aware objectives.

A user's interactions say which items they chose; a top-k list is about all the items they
did not. A catalogue-aware loss therefore scores each positive item against *negatives*:
items drawn from the catalogue. :class:`NegativeSampler` draws them, and gives each drawn
item the sampling correction ``log(M * q(item))`` (M draws, q the probability of drawing the
item) that makes a sampled softmax an unbiased stand-in for the full one (Bengio & Senecal,
2008; Yi et al., 2019 for in-batch negatives):

* ``"catalogue"``: every item, no sampling: the exact full-catalogue softmax (correction 0).
  The right choice while the catalogue fits in memory (tens of thousands of items).
* ``"uniform"``: M items drawn uniformly with replacement.
* ``"popularity"``: M items drawn with probability proportional to ``count ** beta``
  (``beta=0.75`` as in word2vec; 1 is plain popularity, 0 is uniform).
* ``"in_batch"``: the items of the meta-batch's own interactions (other users' positives),
  corrected by their popularity: the two-tower recipe of large-scale retrieval.

The same sampler serves meta-training (a fresh draw per meta-batch) and per-user adaptation
(:meth:`NegativeSampler.inference_draw`: one fixed, seeded draw, so a user's adapted model does
not depend on when they arrive).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["KINDS", "NegativeSampler", "Negatives"]

#: The sampling schemes of :class:`NegativeSampler`.
KINDS = ("catalogue", "uniform", "popularity", "in_batch")


class Negatives(NamedTuple):
    """Negative items for one meta-batch (shared by its users).

    Attributes:
        index: int32 ``[M]`` item indices (encoder indices, 1..num_items-1; padding rows 0).
        correction: float32 ``[M]``: ``log(M * q(item))``, subtracted from a drawn item's score.
        mask: float32 ``[M]``: 1 for a drawn item, 0 for padding.
    """

    index: np.ndarray
    correction: np.ndarray
    mask: np.ndarray


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {name}={value!r}.")
    return int(value)


def _pad_length(n: int) -> int:
    """Padded number of negatives: a power of two from 8 up to 1024, then multiples of 1024,
    so that compiled steps see a few shapes only."""
    n = max(int(n), 8)
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    return -(-n // 1024) * 1024


class NegativeSampler:
    """Draws negative items for a catalogue-aware loss.

    Args:
        kind: one of :data:`KINDS` (see the module docstring).
        num_negatives: M, the number of draws per meta-batch (and for adaptation); ignored by
            ``"catalogue"``, which uses every item. For ``"in_batch"`` it caps how many of the
            batch's interactions are used (a uniform subsample of them when there are more).
        beta: exponent of the item counts for ``"popularity"`` (0 <= beta <= 2).
        seed: seed of the draws (meta-training draws follow the step number; the adaptation
            draw is fixed).

    Call :meth:`fit` with the training interactions' item counts before drawing (the
    meta-learner does it in ``fit`` from the training tasks).
    """

    def __init__(self, kind: str = "catalogue", num_negatives: int = 256, beta: float = 0.75,
                 seed: int = 0) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got kind={kind!r}.")
        self.kind = kind
        self.num_negatives = _check_count("num_negatives", num_negatives)
        try:
            beta = float(beta)
        except (TypeError, ValueError):
            raise ValueError(f"beta must be a number in [0, 2]; got beta={beta!r}.") from None
        if not (0.0 <= beta <= 2.0):
            raise ValueError(f"beta must be a number in [0, 2]; got beta={beta!r}.")
        self.beta = beta
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer; got seed={seed!r}.")
        self.seed = int(seed)
        self.item_counts: np.ndarray | None = None
        self._inference: Negatives | None = None

    # ------------------------------------------------------------------ fitting
    def fit(self, item_counts: np.ndarray) -> NegativeSampler:
        """Set the catalogue and its item counts.

        Args:
            item_counts: interactions per item index, length ``encoder.num_items`` (entry 0,
                the unknown item, is never drawn).

        Returns:
            self.
        """
        counts = np.asarray(item_counts)
        if counts.ndim != 1 or counts.size < 2 or counts.dtype.kind not in "iuf":
            raise ValueError("item_counts must be a flat numeric array with one count per item index "
                             f"(at least one real item); got {counts.dtype} array of shape {counts.shape}.")
        if not np.all(np.isfinite(counts)) or np.any(counts < 0):
            bad = counts[~np.isfinite(counts) | (counts < 0)][:3]
            raise ValueError(f"item_counts must be finite and >= 0; got {bad.tolist()}.")
        self.item_counts = counts.astype(np.float64)
        self._inference = None
        return self

    @classmethod
    def from_tasks(cls, tasks, **kwargs) -> NegativeSampler:
        """A sampler fitted on the item counts of a ``TaskSet``'s interactions."""
        return cls(**kwargs).fit(item_counts_of(tasks))

    @property
    def num_items(self) -> int:
        self._check_fitted()
        return len(self.item_counts)

    def _check_fitted(self) -> None:
        if self.item_counts is None:
            raise ValueError("This NegativeSampler is not fitted: call fit(item_counts) (the "
                             "meta-learner's fit does it from the training tasks).")

    def probabilities(self) -> np.ndarray:
        """q(item) of one draw, per item index (entry 0 is 0)."""
        self._check_fitted()
        n = len(self.item_counts)
        if self.kind in ("catalogue", "uniform"):
            weights = np.ones(n)
        else:
            # Every item keeps a chance: an item nobody chose yet is still a negative.
            beta = 1.0 if self.kind == "in_batch" else self.beta
            weights = np.maximum(self.item_counts, 1.0) ** beta
        weights[0] = 0.0
        return weights / weights.sum()

    # ------------------------------------------------------------------ drawing
    def draw(self, step: int, batch_items: np.ndarray | None = None) -> Negatives:
        """The negatives of meta-training step ``step``.

        Args:
            step: the global step number (the draw is seeded by ``seed`` and ``step``).
            batch_items: for ``"in_batch"``, the item indices of the meta-batch's interactions
                (padding 0s are ignored).

        Returns:
            :class:`Negatives`, padded to a few fixed lengths.
        """
        self._check_fitted()
        if self.kind == "catalogue":
            return self.inference_draw()
        rng = np.random.default_rng([self.seed, int(step)])
        if self.kind == "in_batch":
            if batch_items is None:
                raise ValueError("kind='in_batch' needs the meta-batch's items; got batch_items=None.")
            items = np.asarray(batch_items).reshape(-1)
            items = items[items > 0]
            if len(items) > self.num_negatives:
                items = rng.choice(items, self.num_negatives, replace=False)
            return self._corrected(items.astype(np.int32), self.probabilities())
        q = self.probabilities()
        index = rng.choice(len(q), size=self.num_negatives, p=q).astype(np.int32)
        return self._corrected(index, q)

    def inference_draw(self) -> Negatives:
        """The fixed negatives of per-user adaptation: every item for ``"catalogue"``, else one
        seeded draw of ``num_negatives`` items (``"in_batch"`` draws by popularity, the
        distribution its in-batch negatives follow)."""
        self._check_fitted()
        if self._inference is None:
            q = self.probabilities()
            if self.kind == "catalogue":
                index = np.arange(1, len(q), dtype=np.int32)
                self._inference = self._padded(index, np.zeros(len(index), np.float32))
            else:
                rng = np.random.default_rng([self.seed, 2**32 - 1])
                index = rng.choice(len(q), size=self.num_negatives, p=q).astype(np.int32)
                self._inference = self._corrected(index, q)
        return self._inference

    def _corrected(self, index: np.ndarray, q: np.ndarray) -> Negatives:
        m = max(len(index), 1)
        correction = np.log(m * np.maximum(q[index], 1e-30)).astype(np.float32)
        return self._padded(index, correction)

    @staticmethod
    def _padded(index: np.ndarray, correction: np.ndarray) -> Negatives:
        size = _pad_length(len(index))
        out_index = np.zeros(size, np.int32)
        out_corr = np.zeros(size, np.float32)
        mask = np.zeros(size, np.float32)
        out_index[: len(index)] = index
        out_corr[: len(index)] = correction
        mask[: len(index)] = 1.0
        return Negatives(out_index, out_corr, mask)

    # ------------------------------------------------------------------ saving
    def get_config(self) -> dict:
        return {"kind": self.kind, "num_negatives": self.num_negatives, "beta": self.beta,
                "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict) -> NegativeSampler:
        return cls(**config)

    def __repr__(self) -> str:
        fitted = "unfitted" if self.item_counts is None else f"{len(self.item_counts) - 1} items"
        return (f"NegativeSampler(kind={self.kind!r}, num_negatives={self.num_negatives}, "
                f"beta={self.beta}, seed={self.seed}; {fitted})")


def item_counts_of(tasks) -> np.ndarray:
    """Interactions per item index over every user of a ``TaskSet`` (support and query)."""
    encoder = tasks.encoder
    index = encoder.item_index(tasks.frame()["item_id"].to_numpy())
    return np.bincount(index, minlength=encoder.num_items).astype(np.float64)
