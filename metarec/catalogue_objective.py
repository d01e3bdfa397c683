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

from keras import ops

from metarec.sampling import NegativeSampler

__all__ = ["POSITIVES", "CatalogueObjective"]

#: What counts as a positive item of a user (explicit feedback; implicit uses label 1).
POSITIVES = ("liked", "all")


class CatalogueObjective:
    """Softmax over (positive item, catalogue negatives), plus an optional rating term.

    For one user with positive items P (weights ``w``), ranking scores ``s`` and negatives
    ``n`` with sampling corrections ``c_n`` (0 for the full catalogue)::

        ranking loss = sum_i w_i * (logsumexp([s_i] + [s_n - c_n for n != i]) - s_i) / sum_i w_i
        loss = ranking loss + rating_weight * mean squared error of the rating head

    A negative that is the positive itself (an "accidental hit") is left out.

    Args:
        sampler: the :class:`~metarec.sampling.NegativeSampler` (default: the full catalogue).
        rating_weight: weight of the squared error of the rating head (explicit feedback;
            0 to train ranking only). Ignored for implicit feedback.
        positives: ``"liked"`` (ratings >= ``relevance_threshold``) or ``"all"`` (every
            interaction) on explicit feedback; implicit feedback uses label 1.
        relevance_threshold: the rating that makes an item liked.
    """

    def __init__(self, sampler: NegativeSampler | None = None, rating_weight: float = 1.0,
                 positives: str = "liked", relevance_threshold: float = 4.0) -> None:
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
        self.sampler = sampler
        self.rating_weight = rating_weight
        self.positives = positives
        self.relevance_threshold = relevance_threshold

    # ------------------------------------------------------------------ the loss
    def positive_weights(self, target, mask, feedback: str):
        """Per-row weight of each interaction as a positive (0 or 1, padding 0)."""
        if feedback != "explicit":
            return mask * ops.cast(target > 0.5, mask.dtype)
        if self.positives == "all":
            return mask
        return mask * ops.cast(target >= self.relevance_threshold, mask.dtype)

    def user_loss(self, forward, weights, fixed, non_trainable, inputs, target, mask, negatives,
                  feedback: str):
        """The loss of one user's rows ``inputs`` (``[n, ...]``) against ``negatives``.

        Args:
            forward: the learner's :class:`metarec.inner_loop.Forward`.
            weights, fixed, non_trainable: the model's weights (adapted part, fixed part,
                non-trainable values).
            inputs, target, mask: the user's rows, ratings / labels ``[n]`` and mask ``[n]``.
            negatives: a dict with ``inputs`` (item inputs of the M negatives, ``[M, ...]``),
                ``index`` (``[M]`` item indices), ``correction`` and ``mask`` (``[M]``).
            feedback: "explicit" or "implicit".

        Returns:
            A scalar.
        """
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
        weight = self.positive_weights(target, mask, feedback)
        loss = ops.sum(per_row * weight) / ops.maximum(ops.sum(weight), 1.0)
        if feedback == "explicit" and self.rating_weight:
            error = ops.square(rating[:n] - target)
            loss = loss + self.rating_weight * ops.sum(error * mask) / ops.maximum(ops.sum(mask), 1.0)
        return loss

    # ------------------------------------------------------------------ saving
    def get_config(self) -> dict:
        return {"sampler": self.sampler.get_config(), "rating_weight": self.rating_weight,
                "positives": self.positives, "relevance_threshold": self.relevance_threshold}

    @classmethod
    def from_config(cls, config: dict) -> CatalogueObjective:
        config = dict(config)
        config["sampler"] = NegativeSampler.from_config(config["sampler"])
        return cls(**config)

    def __repr__(self) -> str:
        return (f"CatalogueObjective(sampler={self.sampler!r}, rating_weight={self.rating_weight}, "
                f"positives={self.positives!r}, relevance_threshold={self.relevance_threshold})")
