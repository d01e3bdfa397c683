"""MAML: second-order (exact) and first-order model-agnostic meta-learning."""

import keras
from keras import ops

from metarec import backend
from metarec.learner import MetaLearner


def weighted_user_mean(values, episode):
    """Mean over the real users of a meta-batch (padding users have an empty query set)."""
    weight = ops.cast(ops.sum(episode.query_mask, axis=1) > 0, values.dtype)
    return ops.sum(values * weight) / ops.maximum(ops.sum(weight), 1.0)


@keras.saving.register_keras_serializable(package="metarec")
class MAML(MetaLearner):
    """Model-agnostic meta-learning over users.

    The meta-loss is each user's query loss after ``inner_steps`` of gradient descent on their
    support set, averaged over the meta-batch; its gradient flows through the inner updates.
    With ``first_order=False`` (default) this includes the second-order terms (Hessian-vector
    products through every inner step); ``first_order=True`` treats inner gradients as
    constants (FOMAML), which is cheaper and often nearly as good.

    See ``MetaLearner`` for the other arguments.
    """

    def __init__(self, model, inner_steps=5, inner_lr=0.01, adapt="decision_layers",
                 first_order=False, **kwargs):
        super().__init__(model, inner_steps=inner_steps, inner_lr=inner_lr, adapt=adapt, **kwargs)
        self.first_order = bool(first_order)

    def meta_gradients(self, params, non_trainable, episode):
        def meta_loss(params):
            after = self.user_query_losses(params, non_trainable, episode, with_before=False)
            loss = weighted_user_mean(after, episode)
            return loss, loss

        (_, loss), grads = backend.value_and_grad(meta_loss, has_aux=True)(params)
        return {"loss": loss}, grads

    def get_config(self):
        config = super().get_config()
        config["first_order"] = self.first_order
        return config


@keras.saving.register_keras_serializable(package="metarec")
class MetaSGD(MAML):
    """Meta-SGD: MAML that also meta-learns one inner learning rate per parameter (sign
    included), so the model learns how far and in which direction each weight adapts."""

    def __init__(self, model, inner_steps=1, inner_lr=0.01, adapt="decision_layers",
                 learn_inner_lr="per_parameter", **kwargs):
        super().__init__(model, inner_steps=inner_steps, inner_lr=inner_lr, adapt=adapt,
                         learn_inner_lr=learn_inner_lr, **kwargs)
