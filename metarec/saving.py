"""Loading meta-models saved with ``learner.save("meta.keras")``."""

import os
import zipfile

import keras

from metarec import learned_optimizer, maml, memory, models, reptile  # noqa: F401  (registers the classes a file may name)
from metarec.learner import MetaLearner


def load(path, safe_mode=True):
    """Load a meta-learner (model, metarec settings and feature encoder) from a ``.keras`` file.

    ``safe_mode`` (default) refuses to deserialise arbitrary code such as lambdas. Raises
    ``ValueError`` with the path when the file is missing, not a Keras archive, or not a
    metarec meta-learner.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"No model file at {path!r}.")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not a .keras archive (corrupt or wrong file).")
    try:
        learner = keras.saving.load_model(path, safe_mode=safe_mode)
    except Exception as exc:  # Keras raises many types for damaged archives
        raise ValueError(f"Could not load the model file {path!r}: {exc}") from exc
    if not isinstance(learner, MetaLearner):
        raise ValueError(
            f"{path!r} holds a {type(learner).__name__}, not a metarec meta-learner."
        )
    return learner
