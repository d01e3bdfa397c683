"""Ordinary (non-meta) training of a model on all interactions of the training users.

This is the "global model" baseline: the same Keras architecture trained the usual way, with
no per-user adaptation. It is also a sensible warm start for meta-training.
"""

import keras
import numpy as np


def flatten_interactions(taskset, batch_size=256):
    """Every real (unpadded) interaction of a ``TaskSet``'s users: ``(inputs dict, targets)``."""
    inputs, targets = {}, []
    for episode in taskset.episodes(batch_size, shuffle=False):
        for x, y, m in (
            (episode.support, episode.support_y, episode.support_mask),
            (episode.query, episode.query_y, episode.query_mask),
        ):
            keep = m > 0
            for k, v in x.items():
                inputs.setdefault(k, []).append(v[keep])
            targets.append(y[keep])
    if not targets:
        raise ValueError("The task set has no interactions to train on.")
    return {k: np.concatenate(v) for k, v in inputs.items()}, np.concatenate(targets)


def loss_for(feedback):
    if feedback == "explicit":
        return keras.losses.MeanSquaredError()
    if feedback == "implicit":
        return keras.losses.BinaryCrossentropy(from_logits=True)
    raise ValueError(f"feedback must be 'explicit' or 'implicit'; got {feedback!r}.")


def fit_global_model(
    model,
    train,
    validation=None,
    epochs=10,
    batch_size=256,
    optimizer=None,
    callbacks=None,
    verbose="auto",
):
    """Train ``model`` in place on all interactions of the ``train`` task set.

    ``validation`` (a ``TaskSet``) is scored on all its users' interactions; with no callbacks
    given, training stops early on it and restores the best weights.
    """
    feedback = train.encoder.schema.feedback
    x, y = flatten_interactions(train)
    val = flatten_interactions(validation) if validation is not None else None
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-3), loss=loss_for(feedback))
    if callbacks is None and val is not None:
        callbacks = [keras.callbacks.EarlyStopping(patience=2, restore_best_weights=True)]
    return model.fit(
        x, y, validation_data=val, epochs=epochs, batch_size=batch_size, shuffle=True,
        callbacks=callbacks, verbose=verbose,
    )
