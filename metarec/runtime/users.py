"""Adapted users: ``AdaptedUser`` and the stacked weights of one adaptation call.

Users made by one call share an ``_AdaptedBatch``: their weights stay stacked on the device,
scoring exactly that batch passes them to the score program as they are (:func:`stack`), and
the numpy copies are made only when a user's ``weights`` is read.
"""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd

from metarec import backend
from metarec.ranking import padded_users


class _AdaptedBatch:
    """The adapted weights of one adaptation call: device arrays ``[users_bucket, ...]``."""

    def __init__(self, stacked, n_users):
        self.stacked = stacked
        self.n_users = n_users
        self._numpy = None
        self._lock = threading.Lock()

    def numpy(self):
        with self._lock:
            if self._numpy is None:
                self._numpy = [backend.to_numpy(w) for w in self.stacked]
            return self._numpy


class AdaptedUser:
    """A personal model: the meta-model's weights after a few steps on one user's interactions.

    Obtained from ``learner.adapt(...)`` (``learner.runtime.adapt``) or ``learner.adapt_many``.
    """

    def __init__(self, learner, weights, user_inputs, seen_items):
        self.learner = learner
        self.weights = weights  # adapted weights, numpy, in learner.forward.adapt_index order
        self.user_inputs = user_inputs  # {name: numpy array} of this user's features
        self.seen_items = seen_items  # raw item ids of the support set

    _batch = None
    _row = None

    @property
    def weights(self):
        if self._weights is None:
            self._weights = [w[self._row] for w in self._batch.numpy()]
        return self._weights

    @weights.setter
    def weights(self, value):
        self._weights = value
        self._batch = None  # weights set by hand: the batch's device arrays no longer apply

    def score(self, item_ids=None, unknown_ids=None):
        """Scores (predicted rating, or probability for implicit feedback) of raw item ids;
        ``None`` scores the whole catalogue in index order (``learner.encoder.item_ids[1:]``).
        ``unknown_ids``: the policy for ids outside the catalogue (``metarec.unknown_ids``)."""
        return self.learner.runtime.score(self, item_ids, unknown_ids=unknown_ids)

    def recommend(self, k=10, exclude_seen=True, candidates=None, unknown_ids=None):
        """Top-``k`` as a DataFrame (``item_id``, ``score``), best first."""
        ids, scores = self.learner.runtime.recommend(self, k, exclude_seen, candidates,
                                                     unknown_ids=unknown_ids)
        return pd.DataFrame({"item_id": ids, "score": scores})


def users_of_batch(learner, adapted, batch):
    """One ``AdaptedUser`` per real user of a program's stacked adapted weights (``batch``:
    the :class:`metarec.runtime.requests.SupportBatch` they were adapted on)."""
    shared = _AdaptedBatch(list(adapted), len(batch.per_user))
    users = []
    for u, (inputs, seen) in enumerate(zip(batch.per_user, batch.seen)):
        user = AdaptedUser(learner, None, inputs, seen)
        user._batch, user._row = shared, u
        users.append(user)
    return users


def stack(users, min_users_pad=0):
    """Adapted users -> (stacked weights ``[users_bucket, ...]``, stacked user inputs); the
    users axis holds at least ``min_users_pad`` rows.

    Exactly the users of one adaptation call, in order, give that call's device arrays as they
    are (their padding rows differ from the plain path's, but padded users are dropped); any
    other list stacks the users' numpy weights, padded with copies of the first user.
    """
    n = len(users)
    b = padded_users(n, min_users_pad)
    batch = users[0]._batch
    if (
        batch is not None
        and batch.n_users == n
        and len(batch.stacked[0]) == b
        and all(u._batch is batch and u._row == i for i, u in enumerate(users))
    ):
        weights = batch.stacked
    else:
        weights = [
            np.stack([u.weights[i] for u in users] + [users[0].weights[i]] * (b - n))
            for i in range(len(users[0].weights))
        ]
    inputs = {
        k: np.stack([u.user_inputs[k] for u in users] + [users[0].user_inputs[k]] * (b - n))
        for k in users[0].user_inputs
    }
    return weights, inputs
