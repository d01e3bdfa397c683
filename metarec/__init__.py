"""metarec: meta-learned personalization for cold-start users.

Users are meta-learning tasks; MAML (second and first order), Meta-SGD and Reptile meta-train
any Keras 3 model so that a few gradient steps on a new user's first interactions give a good
personal model.
"""

from metarec import datasets, models
from metarec.adaptation import AdaptedUser
from metarec.encoding import FeatureEncoder
from metarec.interactions import InteractionData
from metarec.learner import MetaLearner
from metarec.maml import MAML, MetaSGD
from metarec.reptile import Reptile
from metarec.saving import load
from metarec.schema import FeatureSpec, Schema
from metarec.tasks import Episode, TaskSet, UserTasks

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
