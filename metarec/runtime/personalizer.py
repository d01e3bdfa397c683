"""``Personalizer``: a meta-learner's per-user calls (``learner.runtime``).

Five calls, each taking any input form (``metarec.runtime.requests``):

* ``adapt(supports, user_features=None)`` -> adapted users;
* ``score(users, candidates=None, head="rating")`` -> one score array per user;
* ``adapt_and_score(supports, candidates=None, user_features=None, head="rating")`` ->
  (adapted users, scores) from one compiled program;
* ``recommend(users_or_supports, k=10, exclude_seen=True, candidates=None,
  user_features=None)`` -> each user's top ``k`` as (raw item ids, scores); given supports,
  adaptation, scoring and ranking run from one compiled program and no user is returned;
* ``predict(item_ids, user_features=None)`` -> the meta-model's own, unadapted scores of raw
  item ids for one user (the reference point).

**Unknown ids.** Raw item ids outside the catalogue (in supports or candidates) and user
feature names the model lacks follow ``unknown_ids`` (``metarec.unknown_ids``): ``"warn"``
(the default, :attr:`Personalizer.unknown_ids`), ``"error"`` or ``"ignore"``; each call that
takes raw ids accepts ``unknown_ids=`` for itself. The messages are the server's.

``supports``: one DataFrame (``item_id``, ``rating``) for one user, a list of DataFrames, or
``FlatSupports`` / ``EncodedSupports``; ``candidates``: None (the whole catalogue), one raw-id
array per user, or ``EncodedCandidates``. **One user or many**: a DataFrame or an
``AdaptedUser`` stands for one user; then ``user_features`` is their dict, ``candidates`` their
array, and the call returns that user's result alone. Every other form stands for many users
and gets one entry per user and a list back.

The learner's older entry points (``learner.adapt_many``, ``adapt_flat``, ``adapt_indices``,
``score_many``, ``score_indices``, ``recommend_many``, ``adapt_score_indices``,
``adapt_recommend_many``, ``predict_items``) are one-line calls of these.

The Personalizer also owns what the calls keep between requests: the compiled programs
(``kernels``, a :class:`metarec.runtime.kernels.KernelCache`), the encoded user features,
the variable lists, the item feature tables as backend tensors and two facts about the model
(whether it takes one user row against many item rows, whether it has a ranking head), each
remade when the learner's model or encoder is replaced.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from keras import ops

from metarec import backend
from metarec.ranking import check_min_pad, mask_padding, mask_seen, mask_seen_lists, top_k
from metarec.runtime import requests
from metarec.runtime.kernels import KernelCache, ScoreSpec
from metarec.runtime.requests import EncodedCandidates
from metarec.runtime.users import AdaptedUser, stack, users_of_batch
from metarec.unknown_ids import check_policy


class Personalizer:
    """The per-user calls of one meta-learner (see the module docstring)."""

    def __init__(self, learner, unknown_ids="warn"):
        self.learner = learner
        #: The default policy for unknown item ids and feature names (``metarec.unknown_ids``).
        self.unknown_ids = check_policy(unknown_ids)
        self.kernels = KernelCache()
        self.user_features = requests.UserFeatureCache()
        self._variables = None  # (model, meta variables, non-trainable variables)
        self._tables = None  # (encoder, {name: tensor})
        self._one_row = None  # (model, bool)
        self._ranking_head = None  # (model, bool)

    @property
    def encoder(self):
        return requests.require_encoder(self.learner.encoder)

    # ------------------------------------------------------------------ the calls
    def adapt(self, supports, user_features=None, unknown_ids=None):
        """Adapted users of ``supports`` (one ``AdaptedUser`` for one DataFrame, else a list)."""
        one = isinstance(supports, pd.DataFrame)
        batch = self._support_batch(supports, user_features, one, unknown_ids)
        params, non_trainable = self._weights()
        adapted = self.kernels.adapt(self.learner)(params, non_trainable, *batch.padded)
        users = users_of_batch(self.learner, adapted, batch)
        return users[0] if one else users

    def score(self, users, candidates=None, head="rating", unknown_ids=None, min_users_pad=0):
        """Scores of each user's candidates (one array for one ``AdaptedUser``, else a list).

        ``head="rating"`` (default): predicted ratings (probabilities for implicit feedback).
        ``head="ranking"``: the scores ``recommend`` ranks by; the same as the ratings except
        for a model with a separate ranking head (``models.two_tower``). ``min_users_pad``:
        run on at least this many user rows (``metarec.ranking.padded_users``)."""
        requests.check_head(head)
        check_min_pad("min_users_pad", min_users_pad)
        one = isinstance(users, AdaptedUser)
        users, candidates = ([users], _one_user(candidates)) if one else (list(users), candidates)
        if not users:
            return []
        cands = requests.candidates(self.encoder, candidates, len(users), self._policy(unknown_ids))
        scores, sizes = self._score(users, cands, head, min_users_pad)
        out = [np.array(scores[u, : sizes[u]]) for u in range(len(users))]  # writable copies
        return out[0] if one else out

    def adapt_and_score(self, supports, candidates=None, user_features=None, head="rating",
                        unknown_ids=None):
        """``adapt`` then ``score`` in one compiled call: one dispatch, and the adapted weights
        stay on the device between the two (the server's path). Returns (users, scores)."""
        one = isinstance(supports, pd.DataFrame)
        candidates = _one_user(candidates) if one else candidates
        batch = self._support_batch(supports, user_features, one, unknown_ids)
        n = len(batch.per_user)
        cands = requests.candidates(self.encoder, candidates, n, self._policy(unknown_ids))
        adapted, scores, sizes = self._adapt_and_score(batch, cands, head)
        users = users_of_batch(self.learner, adapted, batch)
        scores = [np.array(scores[u, : sizes[u]]) for u in range(n)]
        return (users[0], scores[0]) if one else (users, scores)

    def recommend(self, users_or_supports, k=10, exclude_seen=True, candidates=None,
                  user_features=None, unknown_ids=None):
        """Top-``k`` (raw item ids, scores) per user, best first; seen items excluded by default.

        Given adapted users, they are scored by the ranking head; given supports, the users
        are adapted, scored and ranked from one compiled call (the adapted weights are not
        returned: use ``adapt`` to keep them). Ties: the candidate first in its list first
        (``metarec.ranking.top_k``)."""
        requests.check_k(k)
        x = users_or_supports
        one = isinstance(x, (AdaptedUser, pd.DataFrame))
        if one:
            candidates = _one_user(candidates)
        if isinstance(x, AdaptedUser) or (isinstance(x, (list, tuple)) and (not x or isinstance(x[0], AdaptedUser))):
            users = [x] if one else list(x)
            if not users:
                return []
            cands = requests.candidates(self.encoder, candidates, len(users), self._policy(unknown_ids))
            scores, sizes = self._score(users, cands, "ranking")
            seen = [u.seen_items for u in users]
        else:
            batch = self._support_batch(x, user_features, one, unknown_ids)
            cands = requests.candidates(self.encoder, candidates, len(batch.per_user),
                                        self._policy(unknown_ids))
            _, scores, sizes = self._adapt_and_score(batch, cands, "ranking")
            seen = batch.seen
        ranked = self._rank(scores, sizes, cands, seen, k, exclude_seen)
        return ranked[0] if one else ranked

    def predict(self, item_ids, user_features=None):
        """Plain, non-adaptive scores of raw item ids for one user (the reference point)."""
        encoder = self.encoder
        inputs, n = requests.item_rows(encoder, item_ids)
        user = self.user_features.encode(encoder, [user_features])
        if not self.user_row_broadcasts():
            user = {k: np.repeat(v, len(inputs["item_id"]), axis=0) for k, v in user.items()}
        inputs.update(user)
        params, non_trainable = self._weights()
        return backend.to_numpy(self.kernels.predict(self.learner)(params, non_trainable, inputs))[:n]

    def release_kernels(self):
        """Drop the compiled programs (adaptation, scoring, evaluation); they are rebuilt on
        the next call. Each combination of settings keeps its own, so a sweep over settings
        should release them as it goes."""
        self.kernels.clear()

    # ------------------------------------------------------------------ facts about the model
    def has_ranking_head(self):
        """Whether the model has a separate ``"ranking"`` output (``models.two_tower``):
        ``recommend`` then ranks by it, while ``score`` keeps returning the rating head."""
        model = self.learner.model
        if self._ranking_head is None or self._ranking_head[0] is not model:
            struct = getattr(model, "_outputs_struct", None)
            self._ranking_head = (model, isinstance(struct, dict) and "ranking" in struct)
        return self._ranking_head[1]

    def user_row_broadcasts(self):
        """Whether the model takes a user's features as one row against many item rows.

        A model built on ``ConcatDense`` does (its user part is then multiplied once per user,
        not once per candidate); one that concatenates user and item features does not.
        Checked once per model by scoring a few items both ways with the current weights.
        """
        model = self.learner.model
        if self._one_row is not None and self._one_row[0] is model:
            return self._one_row[1]
        encoder = self.encoder
        items = encoder.item_inputs(np.arange(1, min(encoder.num_items, 4), dtype=np.int32))
        n = len(items["item_id"])
        user = self.user_features.encode(encoder, [{}])
        full = dict(items, **{k: np.repeat(v, n, axis=0) for k, v in user.items()})
        one_row = dict(items, **user)
        try:
            expected = _output_arrays(model(full, training=False))
            got = _output_arrays(model(one_row, training=False))
            ok = bool(user) and len(got) == len(expected) and all(
                g.shape == e.shape and np.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))
        except Exception:  # noqa: BLE001 - any failure means "broadcast the rows instead"
            ok = False
        self._one_row = (model, ok)
        return ok

    # ------------------------------------------------------------------ internals
    def _policy(self, unknown_ids):
        return self.unknown_ids if unknown_ids is None else check_policy(unknown_ids)

    def _support_batch(self, supports, user_features, one, unknown_ids=None):
        if one:
            user_features = None if user_features is None else [user_features]
        return requests.support_batch(self.encoder, self.user_features, supports, user_features,
                                      self._policy(unknown_ids))

    def _spec(self, shared, head):
        head = "ranking" if requests.check_head(head) == "ranking" and self.has_ranking_head() else "rating"
        return ScoreSpec(shared, self.user_row_broadcasts(), head)

    def _score(self, users, cands, head, min_users_pad=0):
        """Scores of adapted users as one padded numpy array ``[users_bucket,
        candidates_bucket]``, and each user's number of candidates."""
        spec = self._spec(cands.shared, head)
        weights, inputs = stack(users, min_users_pad)
        items, sizes = requests.item_batch(cands, len(users), len(weights[0]))
        params, non_trainable = self._weights()
        program = self.kernels.score(self.learner, spec)
        scores = program(params, non_trainable, weights, inputs, items, self._item_tables())
        return backend.to_numpy(scores), sizes

    def _adapt_and_score(self, batch, cands, head):
        """The fused program on a support batch: (stacked adapted weights, scores as numpy
        ``[users_bucket, candidates_bucket]``, each user's number of candidates)."""
        spec = self._spec(cands.shared, head)
        items, sizes = requests.item_batch(cands, len(batch.per_user), len(batch.target))
        params, non_trainable = self._weights()
        program = self.kernels.adapt_and_score(self.learner, spec)
        adapted, scores = program(params, non_trainable, *batch.padded, batch.users, items,
                                  self._item_tables())
        return adapted, backend.to_numpy(scores), sizes

    def _rank(self, scores, sizes, cands, seen, k, exclude_seen):
        """Each user's top ``k`` of a padded score matrix as (raw item ids, scores)."""
        encoder = self.encoder
        n = len(seen)
        scores = scores[:n].astype(np.float64)
        ids = cands.ids
        if ids is None:  # encoded candidates: their raw ids
            ids = ([encoder.item_ids[cands.index]] * n if cands.shared
                   else [encoder.item_ids[i] for i in cands.index])
        # Padding columns and seen items can never be chosen.
        mask_padding(scores, sizes)
        if exclude_seen and not cands.shared:
            mask_seen_lists(scores, ids, cands.index, seen, encoder.item_index, encoder.num_items)
        elif exclude_seen:
            mask_seen(scores, ids, seen)
        columns, values = top_k(scores, k)
        return [(ids[u][columns[u]], values[u].astype(np.float32)) for u in range(n)]

    def _weights(self):
        """The learner's weights as the compiled programs take them (``backend.kernel_weights``:
        read when the program runs). The variable lists are kept, since walking the layers for
        them costs more than the rest of a single-user request's bookkeeping."""
        learner = self.learner
        if self._variables is None or self._variables[0] is not learner.model:
            self._variables = (learner.model, learner.meta_variables,
                               list(learner.model.non_trainable_variables))
        _, meta, fixed = self._variables
        return (backend.kernel_weights([v.value for v in meta]),
                backend.kernel_weights([v.value for v in fixed]))

    def _item_tables(self):
        """The encoder's item feature tables as backend tensors, made once per encoder: the
        score programs gather the candidates' features themselves, so a batch of 1,024 users
        with their own 1,000 candidates sends 4 MB of indices, not 50 MB of gathered rows."""
        encoder = self.encoder
        if self._tables is None or self._tables[0] is not encoder:
            self._tables = (encoder, {k: ops.convert_to_tensor(v) for k, v in encoder.item_tables.items()})
        return self._tables[1]


def _one_user(candidates):
    """One user's candidates in the many-user form."""
    return candidates if candidates is None or isinstance(candidates, EncodedCandidates) else [candidates]


def _output_arrays(out):
    """A model's output (one tensor, or a dict of heads) as a list of numpy arrays."""
    if isinstance(out, dict):
        return [backend.to_numpy(out[k]) for k in sorted(out)]
    return [backend.to_numpy(out)]
