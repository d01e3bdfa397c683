"""Per-user quality metrics (pure numpy): rating error and ranking quality.

Every function scores *one* user; the protocol averages over users. Conventions shared by
all ranking metrics:

* **Ranks** are 1-based; the discount of rank ``r`` is ``1 / log2(1 + r)``.
* **Ties** in the scores: :func:`ndcg_at_k` averages the gain over each group of equal
  scores (as ``sklearn.metrics.ndcg_score`` does by default), so its value does not depend
  on the order of a user's items; ``ties="input_order"`` ranks them instead by
  :func:`rank_order`, a *stable* sort by score descending (among equal scores the item that
  comes first in the input keeps the better rank). :func:`rank_items` and the catalogue
  metrics, which score a ranked list, use that stable order: a method that scores
  everything alike gets the ranking of the input order, never a random one, and figures
  are reproducible.
* **K larger than the list** simply uses the whole list (the ideal DCG is truncated the
  same way, so a perfect ranking still scores 1).
* **Undefined values are NaN**: a user with nothing to rank, or with no relevant item,
  has no meaningful nDCG / recall. Such users are excluded from averages (``np.nanmean``)
  and the caller reports how many were excluded.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

__all__ = [
    "catalogue_ndcg_at_k",
    "catalogue_recall_at_k",
    "clip_to_range",
    "mae",
    "ndcg_at_k",
    "rank_order",
    "rank_items",
    "rmse",
]


# --------------------------------------------------------------------------- helpers
def _as_1d_float(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same length, "
                         f"got {a.shape[0]} and {b.shape[0]}")


def _discounts(n: int) -> np.ndarray:
    """``1 / log2(1 + rank)`` for ranks ``1..n``."""
    return 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))


def clip_to_range(predictions, rating_range: Sequence[float] | None) -> np.ndarray:
    """Predictions clipped to ``rating_range = (low, high)``; unchanged when ``None``.

    This is the single place where predictions are clipped: a rating outside the scale can
    never be the right answer, so every error metric scores the clipped value.
    """
    predictions = _as_1d_float(predictions, "predictions")
    if rating_range is None:
        return predictions
    low, high = (float(v) for v in rating_range)
    if not low < high:
        raise ValueError(f"rating_range must be (low, high) with low < high, got {rating_range!r}")
    return np.clip(predictions, low, high)


def _errors(true_ratings, predictions, rating_range) -> np.ndarray:
    truth = _as_1d_float(true_ratings, "true_ratings")
    predicted = clip_to_range(predictions, rating_range)
    _check_same_length(truth, predicted, "true_ratings", "predictions")
    if not np.isfinite(predicted).all():
        raise ValueError(f"predictions must be finite, got {predicted[~np.isfinite(predicted)][:3]!r}")
    return predicted - truth


# --------------------------------------------------------------------------- rating error
def mae(true_ratings, predictions, rating_range: Sequence[float] | None = None) -> float:
    """Mean absolute error of (clipped) predictions; NaN for an empty list."""
    errors = _errors(true_ratings, predictions, rating_range)
    return float(np.mean(np.abs(errors))) if errors.size else float("nan")


def rmse(true_ratings, predictions, rating_range: Sequence[float] | None = None) -> float:
    """Root mean squared error of (clipped) predictions; NaN for an empty list."""
    errors = _errors(true_ratings, predictions, rating_range)
    return float(np.sqrt(np.mean(errors**2))) if errors.size else float("nan")


# --------------------------------------------------------------------------- ranking
def rank_order(scores) -> np.ndarray:
    """Positions of ``scores`` from best to worst.

    Stable sort by score descending: ties keep their input order (see the module notes).
    NaN scores are rejected because they would silently land at an arbitrary rank.
    """
    scores = _as_1d_float(scores, "scores")
    if np.isnan(scores).any():
        raise ValueError(f"scores must not be NaN; got {int(np.isnan(scores).sum())} NaN "
                         f"of {scores.size}")
    # Negating keeps the sort stable (argsort of -x with kind="stable" preserves input
    # order among equal values), unlike reversing an ascending sort.
    return np.argsort(-scores, kind="stable")


def rank_items(item_ids, scores, k: int | None = None) -> np.ndarray:
    """``item_ids`` ordered best first by ``scores`` (ties: input order); the top ``k`` if given."""
    item_ids = np.asarray(item_ids)
    scores = _as_1d_float(scores, "scores")
    if item_ids.shape != scores.shape:
        raise ValueError(f"item_ids and scores must have the same length, "
                         f"got {item_ids.shape[0]} and {scores.shape[0]}")
    order = rank_order(scores)
    if k is not None:
        order = order[: _check_k(k)]
    return item_ids[order]


def ndcg_at_k(true_ratings, scores, k: int, ties: str = "average") -> float:
    """nDCG@k of a user's items ranked by ``scores``, graded by their true ratings.

    Gain ``2**rating - 1``, discount ``log2(1 + rank)``; the ideal DCG ranks the same items
    by their true ratings. Returns NaN when the list is empty or every gain is zero (no
    ranking can be better than another, so the user carries no information).

    ``ties`` says how items of equal score are ranked:

    * ``"average"`` (the default): every item of a group of equal scores gets the group's
      mean gain at each of the group's ranks, as ``sklearn.metrics.ndcg_score`` does with
      ``ignore_ties=False``. The value does not depend on the order of the items: a scorer
      that gives everything the same score gets the nDCG of the average ranking, not that
      of the input order.
    * ``"input_order"``: :func:`rank_order`'s stable sort (among equal scores the item that
      comes first in the input ranks first).
    """
    k = _check_k(k)
    truth = _as_1d_float(true_ratings, "true_ratings")
    scores = _as_1d_float(scores, "scores")
    _check_same_length(truth, scores, "true_ratings", "scores")
    gains = np.power(2.0, truth) - 1.0
    if ties == "average":
        dcg = _tie_averaged_dcg(gains, scores, k)
    elif ties == "input_order":
        top = rank_order(scores)[:k]
        dcg = float(np.sum(gains[top] * _discounts(top.size)))
    else:
        raise ValueError(f"ties must be 'average' or 'input_order', got {ties!r}")
    ideal = np.sort(gains)[::-1][:k]
    idcg = float(np.sum(ideal * _discounts(ideal.size)))
    return dcg / idcg if idcg > 0 else float("nan")


def _tie_averaged_dcg(gains: np.ndarray, scores: np.ndarray, k: int) -> float:
    """DCG@k where each group of equal scores shares its mean gain over its ranks (the
    discounts of the group's ranks within the top ``k``, summed)."""
    if np.isnan(scores).any():
        raise ValueError(f"scores must not be NaN; got {int(np.isnan(scores).sum())} NaN "
                         f"of {scores.size}")
    if not scores.size:
        return 0.0
    _, group, counts = np.unique(-scores, return_inverse=True, return_counts=True)
    mean_gain = np.bincount(group.ravel(), weights=gains, minlength=len(counts)) / counts
    discounts = np.zeros(scores.size)
    top = min(k, scores.size)
    discounts[:top] = _discounts(top)
    cumulative = np.concatenate([[0.0], np.cumsum(discounts)])
    ends = np.cumsum(counts)
    return float(np.sum(mean_gain * (cumulative[ends] - cumulative[ends - counts])))


def _top_k_hits(ranked_item_ids, relevant: Collection, k: int) -> tuple[np.ndarray, int]:
    """Boolean hit vector of the first ``k`` ranked ids, and the number of relevant items."""
    k = _check_k(k)
    ranked = np.asarray(ranked_item_ids)
    if ranked.ndim != 1:
        raise ValueError(f"ranked_item_ids must be one-dimensional, got shape {ranked.shape}")
    relevant = set(relevant.tolist() if isinstance(relevant, np.ndarray) else relevant)
    top = ranked[:k]
    if len(set(top.tolist())) != top.size:
        raise ValueError("ranked_item_ids must not repeat an item within the top k")
    hits = np.fromiter((item in relevant for item in top.tolist()), dtype=bool, count=top.size)
    return hits, len(relevant)


def catalogue_recall_at_k(ranked_item_ids, relevant: Collection, k: int) -> float:
    """Share of the relevant items found in the top ``k`` of a catalogue ranking.

    ``ranked_item_ids`` is the catalogue best first (see :func:`rank_items`). The
    denominator is ``min(k, len(relevant))`` (the "truncated" recall of Liang et al.,
    2018), so a perfect ranking scores 1 even when a user has more than ``k`` relevant
    items. A relevant item missing from the catalogue still counts in the denominator: it
    is one the recommender could not find. NaN when ``relevant`` is empty.

    Ties: the list is scored in the order given. Ranked by :func:`rank_items`, items of
    equal score keep their input (catalogue) order, the first ranking higher.
    """
    hits, n_relevant = _top_k_hits(ranked_item_ids, relevant, k)
    if n_relevant == 0:
        return float("nan")
    return float(hits.sum()) / min(k, n_relevant)


def catalogue_ndcg_at_k(ranked_item_ids, relevant: Collection, k: int) -> float:
    """nDCG@k of a catalogue ranking with binary gain (1 for a relevant item, else 0).

    The ideal DCG places ``min(k, len(relevant))`` relevant items at the top. NaN when
    ``relevant`` is empty.

    Ties: as :func:`catalogue_recall_at_k`, the list is scored in the order given (by
    :func:`rank_items`: equal scores in input order, the first ranking higher).
    """
    hits, n_relevant = _top_k_hits(ranked_item_ids, relevant, k)
    if n_relevant == 0:
        return float("nan")
    dcg = float(np.sum(hits * _discounts(hits.size)))
    idcg = float(np.sum(_discounts(min(k, n_relevant))))
    return dcg / idcg
