"""metarec: meta-learned personalization for cold-start users.

Users are meta-learning tasks; MAML (second and first order), Meta-SGD and Reptile meta-train
any Keras 3 model so that a few gradient steps on a new user's first interactions give a good
personal model; ``LSTMMetaLearner`` learns the update rule itself, ``MemoryLearner`` reads the
support set with a recurrent network.

Names are imported lazily: ``import metarec.client`` or ``metarec.metrics`` does not
pay for importing Keras and TensorFlow; ``metarec.MAML`` and friends load them on first use.
"""

import importlib
import os

from metarec.backend_choice import check_backend_choice

# TensorFlow's C++ start-up chatter (CPU features, missing CUDA) is noise for library users.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# An unsupported or misspelt KERAS_BACKEND: metarec's message, before Keras's own traceback.
check_backend_choice()

__version__ = "0.1.0"

_EXPORTS = {
    "AdaptedUser": "metarec.runtime",
    "ArrayTasks": "metarec.array_tasks",
    "Episode": "metarec.tasks",
    "FeatureEncoder": "metarec.encoding",
    "FeatureSpec": "metarec.schema",
    "InteractionData": "metarec.interactions",
    "LSTMMetaLearner": "metarec.learned_optimizer",
    "MAML": "metarec.maml",
    "MemoryLearner": "metarec.memory",
    "MetaLearner": "metarec.learner",
    "MetaSGD": "metarec.maml",
    "ParquetTasks": "metarec.parquet_tasks",
    "Reptile": "metarec.reptile",
    "Schema": "metarec.schema",
    "TaskSet": "metarec.tasks",
    "UserTasks": "metarec.tasks",
    "load": "metarec.saving",
}
_SUBMODULES = ("datasets", "evaluation", "models", "client", "presets", "priors")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"metarec.{name}")
    else:
        raise AttributeError(f"module 'metarec' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
