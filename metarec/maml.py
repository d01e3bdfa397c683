"""MAML: second-order (exact) and first-order model-agnostic meta-learning."""

import keras
import numpy as np
from keras import ops

from metarec import backend
from metarec.inner_loop import masked_loss, real_users
from metarec.learner import MetaLearner


def weighted_user_mean(values, episode):
    """Mean over the real users of a meta-batch (padding users have an empty query set)."""
    weight = real_users(episode.query_mask, values.dtype)
    return ops.sum(values * weight) / ops.maximum(ops.sum(weight), 1.0)


@keras.saving.register_keras_serializable(package="metarec")
class MAML(MetaLearner):
    """Model-agnostic meta-learning over users.

    The meta-loss is each user's query loss after ``inner_steps`` of gradient descent on their
    support set, averaged over the meta-batch; its gradient flows through the inner updates.
    With ``first_order=False`` (default) this includes the second-order terms (Hessian-vector
    products through every inner step); ``first_order=True`` treats inner gradients as
    constants (FOMAML), which is cheaper and often nearly as good.

    ``ranking_weight > 0`` adds a ranking-aware term to the meta-loss, for catalogue metrics
    that a rating loss alone does not aim at: for each of a user's relevant query items
    (rating >= ``relevance_threshold``, or label 1 for implicit feedback) a sampled pairwise
    (BPR) loss ``softplus(s_neg - s_pos)`` against an item the user did not rate in the episode,
    taken from the query set of another user of the meta-batch (an item chosen by someone else:
    popular items are sampled as often as people rate them). Only the outer loop sees it; the
    inner loop still fits the ratings.

    See ``MetaLearner`` for the other arguments.
    """

    def __init__(self, model, inner_steps=5, inner_lr=0.01, adapt="decision_layers",
                 first_order=False, ranking_weight=0.0, relevance_threshold=4.0, **kwargs):
        super().__init__(model, inner_steps=inner_steps, inner_lr=inner_lr, adapt=adapt, **kwargs)
        if not np.isfinite(ranking_weight) or ranking_weight < 0:
            raise ValueError(f"ranking_weight must be a finite number >= 0; got {ranking_weight!r}.")
        if ranking_weight and self.objective is not None:
            raise ValueError("ranking_weight is the sampled pairwise term of the rating loss; a "
                             "catalogue objective already ranks: pass one or the other, got "
                             f"ranking_weight={ranking_weight!r} and objective={self.objective!r}.")
        self.first_order = bool(first_order)
        self.ranking_weight = float(ranking_weight)
        self.relevance_threshold = float(relevance_threshold)

    def meta_gradients(self, params, non_trainable, batch):
        episode, negatives = self.split_batch(batch)

        def meta_loss(params):
            if self.ranking_weight:
                after, ranking = self.ranked_query_losses(params, non_trainable, episode)
                loss = weighted_user_mean(after, episode)
                rank = weighted_user_mean(ranking, episode)
                return loss + self.ranking_weight * rank, (loss, rank)
            start_weight = getattr(self.objective, "start_weight", 0.0)
            if start_weight:
                # The unadapted start's own query loss too: it ranks for users with no
                # interactions yet.
                before, after = self.user_query_losses(params, non_trainable, episode,
                                                       negatives=negatives)
                loss = weighted_user_mean(after, episode)
                start = weighted_user_mean(before, episode)
                return loss + start_weight * start, (loss, start)
            after = self.user_query_losses(params, non_trainable, episode, with_before=False,
                                           negatives=negatives)
            loss = weighted_user_mean(after, episode)
            return loss, (loss, loss)

        (_, (loss, rank)), grads = backend.value_and_grad(meta_loss, has_aux=True)(params)
        logs = {"loss": loss}
        if self.ranking_weight:
            logs["ranking_loss"] = rank
        elif getattr(self.objective, "start_weight", 0.0):
            logs["start_loss"] = rank
        return logs, grads

    def ranked_query_losses(self, params, non_trainable, episode):
        """Per-user (query loss, pairwise ranking loss) after adaptation (see the class doc)."""
        item_keys = set(self._require_encoder().item_inputs(np.zeros(1, np.int32)))
        q_x, q_y, q_m = episode.query, episode.query_y, episode.query_mask
        # Another user's query items, with this user's own features: items this user did not
        # rate in the episode (up to the rare overlap), in a shape that needs no new gather.
        neg_x = {k: ops.roll(v, 1, axis=0) if k in item_keys else v for k, v in q_x.items()}
        neg_m = ops.roll(q_m, 1, axis=0)
        if self.feedback == "explicit":
            relevant = ops.cast(q_y >= self.relevance_threshold, q_m.dtype)
        else:
            relevant = ops.cast(q_y > 0.5, q_m.dtype)
        pair_w = q_m * relevant * neg_m

        def one_user(params, non_trainable, context, s_x, s_y, s_m, q_x, q_y, q_m, n_x, w):
            adapted, fixed = self.adapt_user(params, non_trainable, s_x, s_y, s_m, context=context)
            pred = self.forward(adapted, fixed, non_trainable, q_x)
            loss = masked_loss(pred, q_y, q_m, self.feedback)
            neg = self.forward(adapted, fixed, non_trainable, n_x)
            pairs = ops.softplus(neg - pred)
            return loss, ops.sum(pairs * w) / ops.maximum(ops.sum(w), 1.0)

        return self.map_users(one_user, params, non_trainable, *episode, neg_x, pair_w)

    def get_config(self):
        config = super().get_config()
        config.update({"first_order": self.first_order, "ranking_weight": self.ranking_weight,
                       "relevance_threshold": self.relevance_threshold})
        return config


@keras.saving.register_keras_serializable(package="metarec")
class MetaSGD(MAML):
    """Meta-SGD: MAML that also meta-learns one inner learning rate per parameter (sign
    included), so the model learns how far and in which direction each weight adapts."""

    def __init__(self, model, inner_steps=1, inner_lr=0.01, adapt="decision_layers",
                 learn_inner_lr="per_parameter", **kwargs):
        super().__init__(model, inner_steps=inner_steps, inner_lr=inner_lr, adapt=adapt,
                         learn_inner_lr=learn_inner_lr, **kwargs)
