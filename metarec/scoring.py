"""Scoring adapted users: candidates, the compiled score kernels, top-k, plain predictions.

Every user's candidates are either one array shared by all (the catalogue, a candidate file,
equal lists in concurrent requests: gathered once, left unbatched in the kernel) or one list
per user (gathered and padded to a bucket). ``recommend_many`` takes the top k of the whole
score matrix in one partition.
"""

import numpy as np
import pandas as pd
from keras import ops

from metarec import backend
from metarec.adaptation import check_item_index
from metarec.ranking import bucket, mask_padding, mask_seen, mask_seen_lists, top_k


def _broadcast_user(user_inputs, n):
    """One user's feature dict ``{name: [...]}`` repeated over ``n`` rows."""
    return {k: ops.broadcast_to(ops.expand_dims(v, 0), (n,) + tuple(v.shape)) for k, v in user_inputs.items()}


def _all_equal(candidates):
    """Whether every user's candidate list is the first one (the same object, or equal)."""
    first = candidates[0]
    first_array = None
    for c in candidates[1:]:
        if c is first:
            continue
        if first_array is None:
            first_array = np.asarray(first)
        c = np.asarray(c)
        if c.shape != first_array.shape or c.dtype != first_array.dtype or not np.array_equal(c, first_array):
            return False
    return True


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got k={k!r}.")


class ScoringMixin:
    """``score_many`` / ``score_indices`` / ``recommend_many`` / ``predict_items`` for
    ``MetaLearner`` (the adapted weights come from ``AdaptationMixin``)."""

    def _user_row_broadcasts(self):
        """Whether the model takes a user's features as one row against many item rows.

        A model built on ``ConcatDense`` does (its user part is then multiplied once per user,
        not once per candidate); one that concatenates user and item features does not.
        Checked once per model by scoring a few items both ways with the current weights.
        """
        cached = self.__dict__.get("_user_row_check")
        if cached is not None and cached[0] is self.model:
            return cached[1]
        encoder = self._require_encoder()
        items = encoder.item_inputs(np.arange(1, min(encoder.num_items, 4), dtype=np.int32))
        n = len(items["item_id"])
        user = self._encode_user_features([{}])
        full = dict(items, **{k: np.repeat(v, n, axis=0) for k, v in user.items()})
        one_row = dict(items, **user)
        try:
            expected = _output_arrays(self.model(full, training=False))
            got = _output_arrays(self.model(one_row, training=False))
            ok = bool(user) and len(got) == len(expected) and all(
                g.shape == e.shape and np.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))
        except Exception:  # noqa: BLE001 - any failure means "broadcast the rows instead"
            ok = False
        self.__dict__["_user_row_check"] = (self.model, ok)
        return ok

    def _item_tables(self):
        """The encoder's item feature tables as backend tensors, made once per encoder: the
        score kernels gather the candidates' features themselves, so a batch of 1,024 users
        with their own 1,000 candidates sends 4 MB of indices, not 50 MB of gathered rows."""
        encoder = self._require_encoder()
        cached = self.__dict__.get("_item_table_tensors")
        if cached is None or cached[0] is not encoder:
            cached = (encoder, {k: ops.convert_to_tensor(v) for k, v in encoder.item_tables.items()})
            self.__dict__["_item_table_tensors"] = cached
        return cached[1]

    def has_ranking_head(self):
        """Whether the model has a separate ``"ranking"`` output (``models.two_tower``):
        ``recommend`` then ranks by it, while ``score`` keeps returning the rating head."""
        cached = self.__dict__.get("_ranking_head_check")
        if cached is None or cached[0] is not self.model:
            struct = getattr(self.model, "_outputs_struct", None)
            cached = (self.model, isinstance(struct, dict) and "ranking" in struct)
            self.__dict__["_ranking_head_check"] = cached
        return cached[1]

    def _head(self, head):
        """The head a kernel computes: "ranking" only for a model that has one."""
        if head not in ("rating", "ranking"):
            raise ValueError(f"head must be 'rating' or 'ranking'; got head={head!r}.")
        return "ranking" if head == "ranking" and self.has_ranking_head() else "rating"

    def _score_fn(self, shared, one_row, head="rating"):
        """The pure scoring of candidates by adapted users: (params, non_trainable, adapted
        ``[users, ...]``, user inputs ``[users, ...]``, candidate item indices, item feature
        tables) -> scores ``[users, items]``; the indices are one array for every user when
        ``shared``, else one row per user. ``head="ranking"`` gives the ranking head's scores
        (a model with one; see ``_head``), otherwise ratings (probabilities for implicit
        feedback)."""
        def fn(params, non_trainable, adapted, users, item_index, tables):
            model_params, _ = self._split_meta(params)
            _, fixed = self.forward.split(model_params)
            items = {"item_id": item_index}
            items.update({k: ops.take(t, item_index, axis=0) for k, t in tables.items()})

            def one(adapted, user, items):
                n = ops.shape(items["item_id"])[0]
                inputs = dict(items)
                if one_row:
                    inputs.update({k: ops.expand_dims(v, 0) for k, v in user.items()})
                else:
                    inputs.update(_broadcast_user(user, n))
                rating, ranking = self.forward.heads(adapted, fixed, non_trainable, inputs)
                if head == "ranking":
                    return ranking
                return rating if self.feedback == "explicit" else ops.sigmoid(rating)

            return backend.vmap(one, (0, 0, None if shared else 0))(adapted, users, items)

        return fn

    def _score_kernel(self, shared, head="rating"):
        one_row = self._user_row_broadcasts()
        head = self._head(head)
        return self._kernel(f"score_shared={shared},one_row={one_row},head={head}",
                            lambda: self._score_fn(shared, one_row, head))

    def _adapt_score_kernel(self, shared, head="rating"):
        one_row = self._user_row_broadcasts()
        head = self._head(head)

        def build():
            adapt, score = self._adapt_fn(), self._score_fn(shared, one_row, head)

            def fn(params, non_trainable, inputs, target, mask, users, item_index, tables):
                adapted = adapt(params, non_trainable, inputs, target, mask)
                return adapted, score(params, non_trainable, adapted, users, item_index, tables)

            return fn

        return self._kernel(f"adapt_score_shared={shared},one_row={one_row},head={head}", build)

    def _item_batch(self, index, shared, n_users, pad_shared=True):
        """Candidate item indices for a score kernel (int32), and each user's number of
        candidates.

        Per-user arrays are padded into ``[users_bucket, candidates_bucket]``; a shared array
        is padded to a bucket too (a new list length must not recompile), except the whole
        catalogue, whose length is fixed per model."""
        if shared:
            sizes = [len(index)] * n_users
            if pad_shared:
                index = np.concatenate([index, np.zeros(bucket(len(index), minimum=8) - len(index), np.int32)])
            return np.asarray(index, np.int32), sizes
        sizes = [len(i) for i in index]
        padded = np.zeros((bucket(n_users), bucket(max(sizes), minimum=8)), np.int32)
        for u, idx in enumerate(index):
            padded[u, : len(idx)] = idx
        return padded, sizes

    def _candidate_index(self, candidates, n_users):
        """Per-user candidate index arrays, or one shared array (the catalogue) when None."""
        encoder = self._require_encoder()
        if candidates is None:
            return np.arange(1, encoder.num_items, dtype=np.int32), True
        if len(candidates) != n_users:
            raise ValueError(f"candidates has {len(candidates)} entries for {n_users} users.")
        if n_users > 1 and _all_equal(candidates):
            # One list shared by every user (a batch job's candidate file, the same candidate
            # list in every request): encoded and gathered once, scored by the shared kernel.
            return encoder.item_index(np.asarray(candidates[0])), True
        arrays = [np.asarray(c) for c in candidates]
        if all(a.ndim == 1 and a.dtype.kind in "iu" for a in arrays):
            # Integer ids: one lookup of all users' candidates (a batch job's million ids),
            # not one call per user.
            index = encoder.item_index(np.concatenate(arrays))
            return np.split(index, np.cumsum([len(a) for a in arrays])[:-1]), False
        return [encoder.item_index(a) for a in arrays], False

    def score_many(self, adapted_users, candidates=None, head="rating"):
        """Scores of each user's candidates (raw item ids; None = whole catalogue).

        ``head="rating"`` (default): predicted ratings (probabilities for implicit feedback).
        ``head="ranking"``: the scores ``recommend`` ranks by; the same as the ratings except
        for a model with a separate ranking head (``models.two_tower``), whose ranking scores
        are unnormalised logits over the catalogue."""
        if not adapted_users:
            return []
        scores, sizes, _, _ = self._score_matrix(adapted_users, candidates, head=head)
        return [np.array(scores[u, : sizes[u]]) for u in range(len(adapted_users))]  # writable copies

    def score_indices(self, adapted_users, item_index, head="rating"):
        """``score_many`` for candidates already encoded (``encoder.item_index``): one int array
        shared by every user, or a list of one array per user."""
        if not adapted_users:
            return []
        n = len(adapted_users)
        scores, sizes, _, _ = self._score_matrix(adapted_users, None, self._checked_index(item_index, n),
                                                 head=head)
        return [np.array(scores[u, : sizes[u]]) for u in range(n)]

    def _checked_index(self, item_index, n_users):
        """Encoded candidates as (one shared array, True) or (one array per user, False),
        every index checked against the catalogue."""
        num_items = self._require_encoder().num_items
        if isinstance(item_index, np.ndarray):
            return check_item_index(item_index, num_items), True
        if len(item_index) != n_users:
            raise ValueError(f"item_index has {len(item_index)} entries for {n_users} users.")
        index = [check_item_index(i, num_items) for i in item_index]
        if n_users > 1 and _all_equal(index):
            return index[0], True
        return index, False

    def _score_matrix(self, adapted_users, candidates, encoded=None, head="rating"):
        """Scores as one padded array ``[users_bucket, candidates_bucket]``, each user's number
        of candidates, whether all users share one candidate array, and the encoded
        candidates (that array, or one per user)."""
        n = len(adapted_users)
        b = bucket(n)
        batch = adapted_users[0]._batch
        if (
            batch is not None
            and batch.n_users == n
            and len(batch.stacked[0]) == b
            and all(u._batch is batch and u._row == i for i, u in enumerate(adapted_users))
        ):
            # Exactly the users of one adapt_many call, in order: its device arrays as they
            # are (padding rows differ from the plain path's, but padded users are dropped).
            weights = batch.stacked
        else:
            weights = [
                np.stack([u.weights[i] for u in adapted_users] + [adapted_users[0].weights[i]] * (b - n))
                for i in range(len(adapted_users[0].weights))
            ]
        users = {
            k: np.stack([u.user_inputs[k] for u in adapted_users] + [adapted_users[0].user_inputs[k]] * (b - n))
            for k in adapted_users[0].user_inputs
        }
        index, shared = encoded if encoded is not None else self._candidate_index(candidates, n)
        items, sizes = self._item_batch(index, shared, n,
                                        pad_shared=candidates is not None or encoded is not None)
        params, non_trainable = self._inference_weights()
        scores = backend.to_numpy(
            self._score_kernel(shared, head)(params, non_trainable, weights, users, items,
                                             self._item_tables())
        )
        return scores, sizes, shared, index

    def adapt_score_indices(self, item_index, ratings, lengths, candidate_index,
                            user_features=None, seen_items=None, head="rating",
                            ratings_checked=False):
        """``adapt_indices`` and then ``score_indices`` in one compiled call: one dispatch,
        and the adapted weights stay on the device between the two (the server's path).

        ``candidate_index``: one encoded array shared by every user, one per user, or None
        (the whole catalogue). ``ratings_checked``: as in ``adapt_indices``. Returns (adapted
        users, one score array per user).
        """
        padded, users, per_user, seen = self._padded_indices(
            item_index, ratings, lengths, user_features, seen_items, ratings_checked)
        n = len(per_user)
        catalogue = candidate_index is None
        index, shared = (self._candidate_index(None, n) if catalogue
                         else self._checked_index(candidate_index, n))
        adapted, scores, sizes = self._adapt_and_score(padded, users, index, shared, n,
                                                       pad_shared=not catalogue, head=head)
        return (self._users_of_batch(adapted, per_user, seen),
                [np.array(scores[u, : sizes[u]]) for u in range(n)])

    def _adapt_and_score(self, padded, users, index, shared, n_users, pad_shared, head="rating"):
        """The fused adapt + score kernel on padded supports and encoded candidates: (stacked
        adapted weights, scores as numpy ``[users_bucket, candidates_bucket]``, each user's
        number of candidates)."""
        items, sizes = self._item_batch(index, shared, n_users, pad_shared=pad_shared)
        params, non_trainable = self._inference_weights()
        adapted, scores = self._adapt_score_kernel(shared, head)(params, non_trainable, *padded, users, items,
                                                           self._item_tables())
        return adapted, backend.to_numpy(scores), sizes

    def recommend_many(self, adapted_users, k=10, exclude_seen=True, candidates=None):
        """Top-``k`` (item ids, scores) per user, best first; seen items excluded by default."""
        _check_k(k)
        if not adapted_users:
            return []
        scores, sizes, shared, index = self._score_matrix(adapted_users, candidates, head="ranking")
        return self._top_k(scores, sizes, shared, index, candidates,
                           [u.seen_items for u in adapted_users], k, exclude_seen)

    def adapt_recommend_many(self, supports, k=10, exclude_seen=True, candidates=None,
                             user_features=None):
        """``recommend_many(adapt_many(supports, user_features), k, exclude_seen, candidates)``
        in one compiled call: one dispatch, and the adapted weights stay on the device (they
        are not returned; use ``adapt_many`` to keep them). The quickest way to rank items
        for users seen once, such as a cold-start request."""
        _check_k(k)
        seen = []
        padded, users, per_user = self.encode_supports(supports, user_features, raw_items=seen)
        n = len(per_user)
        index, shared = self._candidate_index(candidates, n)
        _, scores, sizes = self._adapt_and_score(padded, users, index, shared, n,
                                                 pad_shared=candidates is not None, head="ranking")
        return self._top_k(scores, sizes, shared, index, candidates, seen, k, exclude_seen)

    def _top_k(self, scores, sizes, shared, index, candidates, seen, k, exclude_seen):
        """Each user's top ``k`` of a padded score matrix as (raw item ids, scores); ties:
        the candidate first in its list first (``metarec.ranking.top_k``)."""
        n = len(seen)
        scores = scores[:n].astype(np.float64)
        if candidates is None:
            ids = [self.encoder.item_ids[1:]] * n
        elif shared:
            ids = [np.asarray(candidates[0])] * n
        else:
            ids = [np.asarray(c) for c in candidates]
        # Padding columns and seen items can never be chosen.
        mask_padding(scores, sizes)
        if exclude_seen and not shared:
            mask_seen_lists(scores, ids, index, seen, self.encoder.item_index, self.encoder.num_items)
        elif exclude_seen:
            mask_seen(scores, ids, seen)
        columns, values = top_k(scores, k)
        return [(ids[u][columns[u]], values[u].astype(np.float32)) for u in range(n)]

    def predict_items(self, item_ids, user_features=None):
        """Plain, non-adaptive scores of raw item ids for one user (the reference point)."""
        encoder = self._require_encoder()
        idx = encoder.item_index(np.asarray(item_ids))
        n = len(idx)
        # Padded to a bucket like every other kernel: a new number of items must not recompile.
        padded = np.zeros(bucket(n, minimum=8), np.int32)
        padded[:n] = idx
        inputs = encoder.item_inputs(padded)
        user = self._encode_user_features([user_features])
        if not self._user_row_broadcasts():
            user = {k: np.repeat(v, len(padded), axis=0) for k, v in user.items()}
        inputs.update(user)
        params, non_trainable = self._inference_weights()
        return backend.to_numpy(self._predict_kernel()(params, non_trainable, inputs))[:n]

    def _predict_kernel(self):
        def build():
            def fn(params, non_trainable, inputs):
                model_params, _ = self._split_meta(params)
                adapted, fixed = self.forward.split(model_params)
                out = self.forward(adapted, fixed, non_trainable, inputs)
                return out if self.feedback == "explicit" else ops.sigmoid(out)

            return fn

        return self._kernel("predict", build)


def _output_arrays(out):
    """A model's output (one tensor, or a dict of heads) as a list of numpy arrays."""
    if isinstance(out, dict):
        return [backend.to_numpy(out[k]) for k in sorted(out)]
    return [backend.to_numpy(out)]
