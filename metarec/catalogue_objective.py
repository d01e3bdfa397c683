"""A catalogue-aware loss for one user: chosen items against the rest of the catalogue.

A rating loss only ever sees the items a user rated, so nothing in it says that a rated item
should outrank the thousands the user never chose; adapting on it shifts ratings but barely
reorders the catalogue. :class:`CatalogueObjective` scores each of a user's *positive* items
(liked, or every interaction) against negatives drawn from the catalogue
(:class:`metarec.sampling.NegativeSampler`) with a softmax cross-entropy, optionally next to the
squared error of a rating head. It is the loss of both loops: the inner loop adapts a user's
weights on it over their support set, the outer loop meta-trains on it over the query set.

Models with two outputs, ``{"rating": ..., "ranking": ...}`` (``metarec.models.two_tower``),
train the rating head on the ratings and the ranking head on the catalogue; a model with one
output uses it for both.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from keras import ops

from metarec.sampling import NegativeSampler

__all__ = ["INNER_LOSSES", "POSITIVES", "CatalogueObjective", "piecewise_linear", "rating_weight_knots"]

#: What counts as a positive item of a user (explicit feedback; implicit uses label 1).
POSITIVES = ("liked", "all")
#: The inner loop's ranking loss (see :class:`CatalogueObjective`).
INNER_LOSSES = ("softmax", "linear")


class CatalogueObjective:
    """Softmax over (positive item, catalogue negatives), plus an optional rating term.

    For one user with positive items P (weights ``w``), ranking scores ``s`` and negatives
    ``n`` with sampling corrections ``c_n`` (0 for the full catalogue)::

        ranking loss = sum_i w_i * (logsumexp([s_i] + [s_n - c_n for n != i]) - s_i) / sum_i w_i
        loss = ranking loss + rating_weight * mean squared error of the rating head

    A negative that is the positive itself (an "accidental hit") is left out.

    The inner loop may use a simpler ranking loss, ``inner_loss="linear"``: minus the sum of
    the positives' scores, ``-sum_i w_i s_i``. On ``models.two_tower`` one inner step of rate
    ``lr`` on the adapted user vector then adds ``lr * sum_i q_i`` to it: every item's score
    moves by ``lr * sum_i <q_i, q_item>``, an item-item fold-in of the support like EASE^R's
    or item-kNN's, with item vectors that meta-training learns (start them from
    ``metarec.priors.cooccurrence_embeddings``). The outer loss is always the softmax.

    Args:
        sampler: the :class:`~metarec.sampling.NegativeSampler` (default: the full catalogue).
        rating_weight: weight of the squared error of the rating head (explicit feedback;
            0 to train ranking only). Ignored for implicit feedback.
        positives: ``"liked"`` (ratings >= ``relevance_threshold``) or ``"all"`` (every
            interaction) on explicit feedback; implicit feedback uses label 1.
        relevance_threshold: the rating that makes an item liked.
        inner_loss: ``"softmax"`` (the same loss as the outer loop) or ``"linear"`` (above).
        inner_positives: what counts as a positive in the inner loop; default ``positives``.
            (``"all"`` folds in every support item, liked or not, as EASE^R's fold-in does.)
        inner_rating_weights: explicit feedback only, instead of ``inner_positives``: the
            weight of each support item in the inner loss as a function of its rating,
            given as ``(rating, weight)`` knots: linear between knots, flat beyond the first
            and the last. ``((2, 0), (4, 1))`` weighs 1 and 2 stars 0, 3 stars 0.5 and 4 or
            5 stars 1; a negative weight makes a disliked item push its neighbours down.
            Implicit feedback keeps weight 1 per interaction.
        start_weight: weight, in the meta-loss, of the query loss of the *unadapted* start
            (0: the start is trained only through adaptation). A user with no interactions
            yet is ranked by the start: without this term meta-training may trade its list
            away for a better adapted one.
    """

    def __init__(self, sampler: NegativeSampler | None = None, rating_weight: float = 1.0,
                 positives: str = "liked", relevance_threshold: float = 4.0,
                 inner_loss: str = "softmax", inner_positives: str | None = None,
                 start_weight: float = 0.0,
                 inner_rating_weights: Sequence[tuple[float, float]] | None = None) -> None:
        if sampler is None:
            sampler = NegativeSampler("catalogue")
        if not isinstance(sampler, NegativeSampler):
            raise ValueError(f"sampler must be a metarec.sampling.NegativeSampler; got "
                             f"{type(sampler).__name__} {sampler!r:.100}.")
        try:
            rating_weight = float(rating_weight)
        except (TypeError, ValueError):
            raise ValueError(f"rating_weight must be a finite number >= 0; got {rating_weight!r}.") from None
        if not (rating_weight >= 0 and rating_weight < float("inf")):
            raise ValueError(f"rating_weight must be a finite number >= 0; got {rating_weight!r}.")
        if positives not in POSITIVES:
            raise ValueError(f"positives must be one of {POSITIVES}; got positives={positives!r}.")
        try:
            relevance_threshold = float(relevance_threshold)
        except (TypeError, ValueError):
            raise ValueError(f"relevance_threshold must be a finite number; got {relevance_threshold!r}.") from None
        if relevance_threshold != relevance_threshold or abs(relevance_threshold) == float("inf"):
            raise ValueError(f"relevance_threshold must be a finite number; got {relevance_threshold!r}.")
        if inner_loss not in INNER_LOSSES:
            raise ValueError(f"inner_loss must be one of {INNER_LOSSES}; got inner_loss={inner_loss!r}.")
        if inner_positives is not None and inner_positives not in POSITIVES:
            raise ValueError(f"inner_positives must be None or one of {POSITIVES}; got "
                             f"inner_positives={inner_positives!r}.")
        if inner_rating_weights is not None:
            if inner_positives is not None:
                raise ValueError("inner_positives and inner_rating_weights both say what the inner loop "
                                 f"folds in: pass one of them; got inner_positives={inner_positives!r} "
                                 f"and inner_rating_weights={inner_rating_weights!r}.")
            inner_rating_weights = rating_weight_knots(inner_rating_weights)
        self.inner_loss = inner_loss
        self.inner_positives = inner_positives
        self.inner_rating_weights = inner_rating_weights
        self.sampler = sampler
        self.rating_weight = rating_weight
        self.positives = positives
        self.relevance_threshold = relevance_threshold
        try:
            start_weight = float(start_weight)
        except (TypeError, ValueError):
            raise ValueError(f"start_weight must be a finite number >= 0; got {start_weight!r}.") from None
        if not (0.0 <= start_weight < float("inf")):
            raise ValueError(f"start_weight must be a finite number >= 0; got {start_weight!r}.")
        self.start_weight = start_weight

    # ------------------------------------------------------------------ the loss
    def positive_weights(self, target, mask, feedback: str, inner: bool = False):
        """Per-row weight of each interaction as a positive (0 or 1, or the rating's
        ``inner_rating_weights`` in the inner loop; padding 0)."""
        if feedback != "explicit":
            return mask * ops.cast(target > 0.5, mask.dtype)
        if inner and self.inner_rating_weights is not None:
            return mask * piecewise_linear(target, self.inner_rating_weights)
        positives = self.inner_positives if inner and self.inner_positives else self.positives
        if positives == "all":
            return mask
        return mask * ops.cast(target >= self.relevance_threshold, mask.dtype)

    def user_loss(self, forward, weights, fixed, non_trainable, inputs, target, mask, negatives,
                  feedback: str, inner: bool = False):
        """The loss of one user's rows ``inputs`` (``[n, ...]``) against ``negatives``.

        Args:
            forward: the learner's :class:`metarec.inner_loop.Forward`.
            weights, fixed, non_trainable: the model's weights (adapted part, fixed part,
                non-trainable values).
            inputs, target, mask: the user's rows, ratings / labels ``[n]`` and mask ``[n]``.
            negatives: a dict with ``inputs`` (item inputs of the M negatives, ``[M, ...]``),
                ``index`` (``[M]`` item indices), ``correction`` and ``mask`` (``[M]``).
            feedback: "explicit" or "implicit".
            inner: the inner loop's loss (``inner_loss``, ``inner_positives``) rather than the
                outer loop's.

        Returns:
            A scalar.
        """
        if inner and self.inner_loss == "linear":
            rating, ranking = forward.heads(weights, fixed, non_trainable, inputs)
            weight = self.positive_weights(target, mask, feedback, inner=True)
            return -ops.sum(ranking * weight) + self._rating_term(rating, target, mask, feedback)
        n = ops.shape(target)[0]
        m = ops.shape(negatives["mask"])[0]
        neg_items = negatives["inputs"]
        # Support rows and negatives in one forward pass: negatives carry this user's features
        # (every row of ``inputs`` holds them; the first is taken).
        joined = {}
        for key, value in inputs.items():
            if key in neg_items:
                joined[key] = ops.concatenate([value, ops.cast(neg_items[key], value.dtype)], axis=0)
            else:
                row = value[:1]
                joined[key] = ops.concatenate(
                    [value, ops.broadcast_to(row, (m,) + tuple(row.shape[1:]))], axis=0)
        rating, ranking = forward.heads(weights, fixed, non_trainable, joined)
        pos_scores = ranking[:n]
        neg_scores = ranking[n:] - negatives["correction"]
        # [n, M]: negatives that are padding or the row's own item are left out.
        own = ops.cast(inputs["item_id"], "int32")[:, None] == ops.cast(negatives["index"], "int32")[None, :]
        keep = ops.logical_and(negatives["mask"][None, :] > 0, ops.logical_not(own))
        very_negative = ops.cast(-1e9, neg_scores.dtype)
        neg_matrix = ops.where(keep, ops.broadcast_to(neg_scores[None, :], (n, m)), very_negative)
        logits = ops.concatenate([pos_scores[:, None], neg_matrix], axis=1)
        per_row = ops.logsumexp(logits, axis=1) - pos_scores
        weight = self.positive_weights(target, mask, feedback, inner=inner)
        loss = ops.sum(per_row * weight) / ops.maximum(ops.sum(weight), 1.0)
        return loss + self._rating_term(rating[:n], target, mask, feedback)

    def _rating_term(self, rating, target, mask, feedback: str):
        """``rating_weight`` times the rating head's mean squared error (explicit feedback)."""
        if feedback != "explicit" or not self.rating_weight:
            return ops.zeros((), dtype=rating.dtype)
        error = ops.square(rating - target)
        return self.rating_weight * ops.sum(error * mask) / ops.maximum(ops.sum(mask), 1.0)

    # ------------------------------------------------------------------ saving
    def get_config(self) -> dict:
        return {"sampler": self.sampler.get_config(), "rating_weight": self.rating_weight,
                "positives": self.positives, "relevance_threshold": self.relevance_threshold,
                "inner_loss": self.inner_loss, "inner_positives": self.inner_positives,
                "start_weight": self.start_weight,
                "inner_rating_weights": (None if self.inner_rating_weights is None
                                         else [list(knot) for knot in self.inner_rating_weights])}

    @classmethod
    def from_config(cls, config: dict) -> CatalogueObjective:
        config = dict(config)
        config["sampler"] = NegativeSampler.from_config(config["sampler"])
        return cls(**config)

    def __repr__(self) -> str:
        return (f"CatalogueObjective(sampler={self.sampler!r}, rating_weight={self.rating_weight}, "
                f"positives={self.positives!r}, relevance_threshold={self.relevance_threshold}, "
                f"inner_loss={self.inner_loss!r}, inner_positives={self.inner_positives!r}, "
                f"start_weight={self.start_weight}, inner_rating_weights={self.inner_rating_weights!r})")


# ---------------------------------------------------------------------- rating weights
def rating_weight_knots(knots) -> tuple[tuple[float, float], ...]:
    """``knots`` checked: a non-empty sequence of ``(rating, weight)`` pairs of finite
    numbers with strictly increasing ratings, returned as a tuple of float pairs."""
    what = ("inner_rating_weights must be a non-empty sequence of (rating, weight) pairs of "
            "finite numbers with increasing ratings, such as ((2, 0), (4, 1))")
    if isinstance(knots, (str, bytes)) or not isinstance(knots, Sequence) or not len(knots):
        raise ValueError(f"{what}; got {knots!r}.")
    checked = []
    for knot in knots:
        if isinstance(knot, (str, bytes)) or not isinstance(knot, Sequence) or len(knot) != 2:
            raise ValueError(f"{what}; got the knot {knot!r} in {knots!r}.")
        pair = []
        for value in knot:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{what}; got the value {value!r} in {knots!r}.")
            pair.append(float(value))
        if checked and pair[0] <= checked[-1][0]:
            raise ValueError(f"{what}; got rating {pair[0]!r} after {checked[-1][0]!r} in {knots!r}.")
        checked.append(tuple(pair))
    return tuple(checked)


def piecewise_linear(x, knots: Sequence[tuple[float, float]]):
    """``x`` mapped through the piecewise-linear function through ``knots`` (``(x, y)``
    pairs, increasing ``x``), flat beyond the first and the last knot."""
    y = ops.zeros_like(x) + knots[0][1]
    for (x0, y0), (x1, y1) in zip(knots[:-1], knots[1:]):
        y = y + (y1 - y0) * ops.clip((x - x0) / (x1 - x0), 0.0, 1.0)
    return y
