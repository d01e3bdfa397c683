"""metarec: meta-learned personalization for cold-start users.

Users are meta-learning tasks; MAML (second and first order), Meta-SGD and Reptile meta-train
any Keras 3 model so that a few gradient steps on a new user's first interactions give a good
personal model.
"""

import os

# TensorFlow's C++ start-up chatter (CPU features, missing CUDA) is noise for library users.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from metarec import datasets, models  # noqa: E402
from metarec.adaptation import AdaptedUser  # noqa: E402
from metarec.encoding import FeatureEncoder  # noqa: E402
from metarec.interactions import InteractionData  # noqa: E402
from metarec.learner import MetaLearner  # noqa: E402
from metarec.maml import MAML, MetaSGD  # noqa: E402
from metarec.reptile import Reptile  # noqa: E402
from metarec.saving import load  # noqa: E402
from metarec.schema import FeatureSpec, Schema  # noqa: E402
from metarec.tasks import Episode, TaskSet, UserTasks  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdaptedUser",
    "Episode",
    "FeatureEncoder",
    "FeatureSpec",
    "InteractionData",
    "MAML",
    "MetaLearner",
    "MetaSGD",
    "Reptile",
    "Schema",
    "TaskSet",
    "UserTasks",
    "datasets",
    "load",
    "models",
]
