"""Reptile: move the initialisation toward each user's adapted weights."""

import keras
from keras import ops

from metarec import backend
from metarec.inner_loop import real_users
from metarec.learner import MetaLearner


@keras.saving.register_keras_serializable(package="metarec")
class Reptile(MetaLearner):
    """Reptile (Nichol et al., 2018) over users.

    For each user of the meta-batch, ``inner_steps`` of SGD on all of the user's training
    interactions (support and query together) give adapted weights; the outer "gradient" of
    the adapted weights is ``initial - mean(adapted)``, so an SGD outer optimizer with rate
    ``eps`` performs exactly ``initial + eps * (mean(adapted) - initial)``. Any Keras optimizer
    may be used instead. Weights that do not adapt per user get the first-order gradient of
    the query loss at the adapted weights. The logged ``loss`` is that query loss.
    """

    def __init__(self, model, inner_steps=5, inner_lr=0.01, adapt="decision_layers", **kwargs):
        if kwargs.get("learn_inner_lr") is not None:
            raise ValueError(
                "Reptile has no gradient through the inner learning rates; got "
                f"learn_inner_lr={kwargs['learn_inner_lr']!r}. Use MAML or MetaSGD to learn them."
            )
        super().__init__(model, inner_steps=inner_steps, inner_lr=inner_lr, adapt=adapt, **kwargs)

    def meta_gradients(self, params, non_trainable, batch):
        episode, negatives = self.split_batch(batch)

        def one_user(s_x, s_y, s_m, q_x, q_y, q_m):
            x = {k: ops.concatenate([s_x[k], q_x[k]], axis=0) for k in s_x}
            y = ops.concatenate([s_y, q_y], axis=0)
            m = ops.concatenate([s_m, q_m], axis=0)
            adapted, _ = self.adapt_user(params, non_trainable, x, y, m, negatives=negatives)
            return [ops.stop_gradient(w) for w in adapted]

        adapted = backend.vmap(one_user, (0,) * 6)(*episode)
        weight = real_users(episode.query_mask, episode.query_y.dtype)
        count = ops.maximum(ops.sum(weight), 1.0)

        def user_mean(stacked):
            w = ops.reshape(weight, (-1,) + (1,) * (len(stacked.shape) - 1))
            return ops.sum(stacked * w, axis=0) / count

        model_params, _ = self.split_meta(params)
        initial, fixed = self.forward.split(model_params)

        # The fixed weights' gradient is the mean of the users' query-loss gradients at their
        # adapted weights, taken once for the batch: a per-user gradient inside the map would
        # materialise one copy of every fixed weight (embedding tables included) per user.
        def mean_query_loss(fixed):
            def one(adapted, q_x, q_y, q_m):
                return self.user_loss(adapted, fixed, non_trainable, q_x, q_y, q_m, negatives)

            losses = backend.vmap(one, (0, 0, 0, 0))(adapted, *episode[3:])
            return ops.sum(losses * weight) / count

        loss, fixed_grads = backend.value_and_grad(mean_query_loss)(fixed)
        adapt_grads = [w0 - user_mean(w) for w0, w in zip(initial, adapted)]
        grads = self.merge_meta(self.forward.merge(adapt_grads, fixed_grads), [])
        return {"loss": loss}, grads
