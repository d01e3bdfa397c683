"""Per-item priors: the fixed inputs of the residual presets.

``presets.residual_maml`` and ``presets.residual_memory`` predict a residual on top of a
fixed value per item; :func:`item_mean_prior` builds it from the training users' ratings::

    prior = metarec.priors.item_mean_prior(tasks)          # tasks: a UserTasks
    learner = metarec.presets.residual_maml(tasks.encoder, prior)
"""

from __future__ import annotations

import numpy as np

from metarec.encoding import FeatureEncoder
from metarec.interactions import InteractionData
from metarec.tasks import TaskSet, UserTasks

__all__ = ["item_mean_prior"]


class _Frame:
    """The two things the item-mean statistics read from a task set: encoder and frame."""

    def __init__(self, encoder: FeatureEncoder, data: InteractionData) -> None:
        self.encoder = encoder
        self._data = data

    def frame(self):
        return self._data.interactions


def item_mean_prior(
    source: UserTasks | TaskSet | InteractionData,
    damping: float | None = None,
    val: TaskSet | None = None,
    encoder: FeatureEncoder | None = None,
) -> np.ndarray:
    """Damped item means, one per item index: the ``item_prior`` of the residual presets.

    ``prior[i] = (sum of item i's ratings + damping * global mean) / (count(i) + damping)``
    over the training ratings: a Bayesian average where the global mean counts as ``damping``
    pseudo-ratings. Index 0 (the unknown item) and items without a training rating get the
    global mean.

    Args:
        source: where the training ratings come from: a :class:`UserTasks` (its ``train``
            users; ``val`` defaults to its validation users), a :class:`TaskSet`, or an
            :class:`InteractionData` (every rating; needs ``encoder``).
        damping: pseudo-ratings of the global mean per item (>= 0). ``None``: chosen from
            ``(0, 1, 2, 5, 10, 20, 50, 100)`` by the per-user MAE on the query ratings of the
            ``val`` users, given their support; 5 when there are no validation users.
        val: validation users for choosing ``damping`` (never used for the means).
        encoder: the model's feature encoder, whose item indexes the prior follows; default
            the encoder of ``source`` (required for an ``InteractionData``).

    Returns:
        A float32 array of length ``encoder.num_items``, indexed by item index, as
        ``presets.residual_maml(encoder, item_prior)`` and ``models.residual_mlp`` take it.

    Raises:
        ValueError: on a source of another type, a negative or non-finite ``damping``, no
            encoder for an ``InteractionData``, or no training ratings.
    """
    from metarec.evaluation.methods import ItemMean

    if isinstance(source, UserTasks):
        train, val = source.train, source.val if val is None else val
    elif isinstance(source, TaskSet):
        train = source
    elif isinstance(source, InteractionData):
        if encoder is None:
            raise ValueError("item_mean_prior of an InteractionData needs encoder= (the model's "
                             "FeatureEncoder, whose item indexes the prior follows); got None.")
        train = _Frame(encoder, source)
    else:
        raise ValueError(f"item_mean_prior needs a UserTasks, TaskSet or InteractionData; got "
                         f"{type(source).__name__}.")
    if val is not None and not isinstance(val, TaskSet):
        raise ValueError(f"val must be a TaskSet; got {type(val).__name__}.")
    if damping is not None:
        if isinstance(damping, bool) or not isinstance(damping, (int, float, np.integer, np.floating)) \
                or not np.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite number >= 0; got {damping!r}.")
        val = None
    encoder = train.encoder if encoder is None else encoder
    if not isinstance(encoder, FeatureEncoder):
        raise ValueError(f"encoder must be a fitted FeatureEncoder; got {type(encoder).__name__}.")
    model = ItemMean() if damping is None else ItemMean(damping=float(damping), damping_grid=None)
    if not len(train.frame()):
        raise ValueError(f"item_mean_prior needs training ratings; got {type(source).__name__} "
                         "with no interactions.")
    model.fit(train, val)
    ids = encoder.item_ids[1:]
    prior = model._item_predictions(np.asarray(ids.tolist()), model.params["damping"])
    return np.concatenate([[model.global_mean_], prior]).astype(np.float32)
