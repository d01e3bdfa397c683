"""Per-user adaptation and scoring, vectorised over users.

The SDK (``learner.adapt``), batch jobs and the gRPC server all come through here, and here
through the learner's single pure adaptation function (``MetaLearner.adapt_user``). Requests are
padded into a few fixed shapes (users, support size and candidates each rounded up to a bucket),
so compiled code is traced once per bucket and never per request.
"""

import threading

import numpy as np
import pandas as pd
from keras import ops

from metarec import backend


def bucket(n, minimum=1):
    """Smallest power of two >= max(n, minimum) up to 1024, then the next multiple of 1024."""
    n = max(int(n), minimum, 1)
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    return -(-n // 1024) * 1024


def support_bucket(n):
    """Padded support length: a multiple of 8 up to 64, then ``bucket``.

    Every padded row costs a full forward and backward pass at each inner step, so supports
    pad more tightly than candidates (K = 20 pads to 24, not 32: a quarter less adaptation
    work) at the price of at most eight compiled shapes up to 64.
    """
    n = max(int(n), 1)
    if n <= 64:
        return -(-n // 8) * 8
    return bucket(n)


def _broadcast_user(user_inputs, n):
    """One user's feature dict ``{name: [...]}`` repeated over ``n`` rows."""
    return {k: ops.broadcast_to(ops.expand_dims(v, 0), (n,) + tuple(v.shape)) for k, v in user_inputs.items()}


def _encode_interactions(encoder, supports):
    """``encoder.encode_interactions`` of each frame, in one call where the frames agree.

    The encoding is element-wise, so one call on the concatenated columns gives the same
    arrays; frames whose column dtypes differ, or any error, take the per-frame path (which
    also raises exactly the per-frame error).
    """
    if len(supports) > 1:
        try:
            items = [frame["item_id"].to_numpy() for frame in supports]
            ratings = [frame["rating"].to_numpy() for frame in supports]
        except (KeyError, TypeError, AttributeError):
            items = None
        if (
            items is not None
            and len({a.dtype for a in items}) == 1
            and len({a.dtype for a in ratings}) == 1
            and items[0].dtype.kind in "iuU"
            and ratings[0].dtype.kind in "iuf"
        ):
            try:
                idx, y = encoder.encode_interactions(
                    pd.DataFrame({"item_id": np.concatenate(items), "rating": np.concatenate(ratings)})
                )
            except ValueError:
                pass
            else:
                bounds = np.cumsum([len(a) for a in items])[:-1]
                return list(zip(np.split(idx, bounds), np.split(y, bounds)))
    return [encoder.encode_interactions(frame) for frame in supports]


class _AdaptedBatch:
    """The adapted weights of one ``adapt_many`` call: device arrays ``[users_bucket, ...]``."""

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


_SCALAR_TYPES = (str, int, float, bool, np.integer, np.floating, np.bool_, type(None))
_FEATURE_CACHE_SIZE = 4096
_XLA = __import__('os').environ.get('METAREC_XLA', '1') == '1'


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


def _mask_seen(scores, ids, seen):
    """Set ``scores[u, j] = -inf`` where candidate ``ids[u][j]`` is among ``seen[u]``.

    Many users sharing one candidate array (a catalogue, a candidate file) are looked up in
    one hash index of it; anything else (a few users, duplicate candidates, lists that differ)
    goes user by user.
    """
    if len(ids) >= 16 and all(c is ids[0] for c in ids):
        try:
            index = pd.Index(ids[0])
            if index.is_unique:
                flat = np.concatenate([np.asarray(s, dtype=object) for s in seen]) if seen else []
                owner = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
                pos = index.get_indexer(pd.Index(flat, dtype=object))
                hit = pos >= 0
                scores[owner[hit], pos[hit]] = -np.inf
                return
        except (TypeError, ValueError):
            pass
    for u, (cands, s) in enumerate(zip(ids, seen)):
        scores[u, : len(cands)][np.isin(cands, s)] = -np.inf


class AdaptedUser:
    """A personal model: the meta-model's weights after a few steps on one user's interactions.

    Obtained from ``learner.adapt(...)`` or ``learner.adapt_many(...)``.
    """

    def __init__(self, learner, weights, user_inputs, seen_items):
        self.learner = learner
        self.weights = weights  # adapted weights, numpy, in learner.forward.adapt_index order
        self.user_inputs = user_inputs  # {name: numpy array} of this user's features
        self.seen_items = seen_items  # raw item ids of the support set

    # Users made by one ``adapt_many`` call share an ``_AdaptedBatch``: their weights stay
    # stacked on the device, ``score_many`` of exactly that batch passes them to the score
    # kernel as they are, and the numpy copies are made only when ``weights`` is read.
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

    @classmethod
    def _from_batch(cls, learner, batch, row, user_inputs, seen_items):
        user = cls(learner, None, user_inputs, seen_items)
        user._batch, user._row = batch, row
        return user

    def score(self, item_ids=None):
        """Scores (predicted rating, or probability for implicit feedback) of raw item ids;
        ``None`` scores the whole catalogue in index order (``learner.encoder.item_ids[1:]``)."""
        return self.learner.score_many([self], None if item_ids is None else [item_ids])[0]

    def recommend(self, k=10, exclude_seen=True, candidates=None):
        """Top-``k`` as a DataFrame (``item_id``, ``score``), best first."""
        candidates = None if candidates is None else [candidates]
        ids, scores = self.learner.recommend_many([self], k, exclude_seen, candidates)[0]
        return pd.DataFrame({"item_id": ids, "score": scores})


class AdaptationMixin:
    """``adapt`` / ``adapt_many`` / ``score_many`` / ``recommend_many`` for ``MetaLearner``."""

    # ------------------------------------------------------------------ encoding requests
    def _require_encoder(self):
        if self.encoder is None:
            raise ValueError(
                "This learner has no feature encoder: fit it on a TaskSet, or pass encoder=."
            )
        return self.encoder

    def encode_supports(self, supports, user_features=None):
        """Pad users' support frames into arrays ``[B_bucket, S_bucket]``; returns the arrays,
        the number of real users and each user's feature dict."""
        encoder = self._require_encoder()
        if isinstance(supports, pd.DataFrame):
            raise ValueError("supports must be a list of DataFrames, one per user; received one DataFrame.")
        supports = list(supports)
        if not supports:
            raise ValueError("supports is empty: pass at least one user's interactions.")
        n_users = len(supports)
        if user_features is None:
            user_features = [{}] * n_users
        if len(user_features) != n_users:
            raise ValueError(
                f"user_features has {len(user_features)} entries for {n_users} users."
            )
        encoded = _encode_interactions(encoder, supports)
        return self._pad_supports(
            np.concatenate([idx for idx, _ in encoded]),
            np.concatenate([y for _, y in encoded]),
            [len(idx) for idx, _ in encoded],
            user_features,
        )

    def _pad_supports(self, idx, y, lengths, user_features):
        """Encoded interactions of many users, flat (user ``u``'s are the next ``lengths[u]``
        rows), padded into arrays ``[B_bucket, S_bucket]`` in one scatter."""
        encoder = self._require_encoder()
        lengths = np.asarray(lengths, dtype=np.int64)
        n_users = len(lengths)
        b = bucket(n_users)
        s = support_bucket(int(lengths.max()))
        rows = np.repeat(np.arange(n_users), lengths)
        cols = np.arange(len(idx)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        item_idx = np.zeros((b, s), np.int32)
        target = np.zeros((b, s), np.float32)
        mask = np.zeros((b, s), np.float32)
        item_idx[rows, cols] = idx
        target[rows, cols] = y
        mask[rows, cols] = 1.0
        users = self._encode_user_features(list(user_features) + [{}] * (b - n_users))
        inputs = encoder.item_inputs(item_idx)
        inputs.update({k: np.repeat(v[:, None], s, axis=1) for k, v in users.items()})
        per_user = [{k: v[u] for k, v in users.items()} for u in range(n_users)]
        return (inputs, target, mask), users, per_user

    def _encode_user_features(self, user_features):
        """``encoder.user_inputs_from_features`` of a list of dicts, one row per user.

        Users' features repeat across requests (a handful of segments, ages, countries) and
        encoding them goes through pandas (about 1 ms a call), so each distinct user's row is
        encoded once and kept: users of scalar features only are keyed by their schema
        features' (type, value); anything else takes the plain path.
        """
        encoder = self._require_encoder()
        names = tuple(spec.name for spec in encoder.schema.user_features)
        dicts = [dict(f or {}) for f in user_features]
        keys = []
        for f in dicts:
            key = tuple((n, type(f[n]), f[n]) for n in names if n in f)
            if not all(isinstance(v, _SCALAR_TYPES) for _, _, v in key):
                return encoder.user_inputs_from_features(dicts)
            keys.append(key)
        cache = self.__dict__.get("_feature_cache")
        if cache is None or cache[0] is not encoder:
            cache = (encoder, {})
            self.__dict__["_feature_cache"] = cache
        rows = cache[1]
        missing = [i for i, key in enumerate(keys) if key not in rows]
        if not names:
            return encoder.user_inputs_from_features(dicts)
        if missing:
            if len(rows) + len(missing) > _FEATURE_CACHE_SIZE:
                rows.clear()
            for i in missing:
                # One user per call, so that no user's encoding depends on the others'.
                one = encoder.user_inputs_from_features([dicts[i]])
                rows[keys[i]] = {k: v[0] for k, v in one.items()}
        got = [rows[key] for key in keys]
        return {k: np.stack([r[k] for r in got]) for k in got[0]}

    # ------------------------------------------------------------------ compiled kernels
    def release_kernels(self):
        """Drop the compiled adaptation, scoring and evaluation kernels; they are rebuilt on
        the next call. Each setting (e.g. each ``inner_steps``) keeps its own compiled
        program, so a sweep over settings should release them as it goes."""
        self.__dict__.get("_kernel_cache", {}).clear()

    def _kernel(self, name, build):
        # Settings are baked in at trace time: key the cache on them too.
        key = (name, self.inner_steps, self.feedback, getattr(self, "proximal", 0.0))
        cache = self.__dict__.setdefault("_kernel_cache", {})
        if key not in cache:
            cache[key] = backend.jit(build(), xla=_XLA)
        return cache[key]

    def _adapt_kernel(self):
        def build():
            def fn(params, non_trainable, inputs, target, mask):
                if self.inner_steps == 0 and not self.reads_support:
                    # Nothing to adapt: every user gets the initialisation. (Mapping a function
                    # that ignores its mapped inputs fails under tf.vectorized_map.)
                    adapted, _ = self.initial_weights(params)
                    users = ops.shape(target)[0]
                    return [ops.broadcast_to(w[None], (users,) + tuple(w.shape)) for w in adapted]

                def one(params, non_trainable, context, inputs, target, mask):
                    adapted, _ = self.adapt_user(
                        params, non_trainable, inputs, target, mask, context=context
                    )
                    return adapted

                return self.map_users(one, params, non_trainable, inputs, target, mask)

            return fn

        return self._kernel("adapt", build)

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
            expected = backend.to_numpy(self.model(full, training=False))
            got = backend.to_numpy(self.model(one_row, training=False))
            ok = bool(user) and got.shape == expected.shape and np.allclose(got, expected, atol=1e-5)
        except Exception:  # noqa: BLE001 - any failure means "broadcast the rows instead"
            ok = False
        self.__dict__["_user_row_check"] = (self.model, ok)
        return ok

    def _score_kernel(self, shared):
        one_row = self._user_row_broadcasts()

        def build():
            def fn(params, non_trainable, adapted, users, items):
                model_params, _ = self._split_meta(params)
                _, fixed = self.forward.split(model_params)

                def one(adapted, user, items):
                    n = ops.shape(items["item_id"])[0]
                    inputs = dict(items)
                    if one_row:
                        inputs.update({k: ops.expand_dims(v, 0) for k, v in user.items()})
                    else:
                        inputs.update(_broadcast_user(user, n))
                    out = self.forward(adapted, fixed, non_trainable, inputs)
                    return out if self.feedback == "explicit" else ops.sigmoid(out)

                return backend.vmap(one, (0, 0, None if shared else 0))(adapted, users, items)

            return fn

        return self._kernel(f"score_shared={shared},one_row={one_row}", build)

    # ------------------------------------------------------------------ public API
    def adapt(self, interactions, user_features=None):
        """Adapt the meta-model to one user's few interactions (a DataFrame with ``item_id`` and
        ``rating``); returns an ``AdaptedUser`` with ``score`` and ``recommend``."""
        return self.adapt_many([interactions], None if user_features is None else [user_features])[0]

    def adapt_many(self, supports, user_features=None):
        """Adapt to many users at once (one vectorised, compiled call per bucket of users)."""
        padded, _, per_user = self.encode_supports(supports, user_features)
        return self._adapt_padded(padded, per_user, [np.asarray(frame["item_id"]) for frame in supports])

    def adapt_flat(self, item_ids, ratings, lengths, user_features=None):
        """``adapt_many`` for interactions given as flat arrays, the way a batch job holds them:
        user ``u``'s support is the next ``lengths[u]`` entries of ``item_ids`` / ``ratings``
        (raw item ids and ratings, checked as ``adapt_many`` checks them). Faster than building
        one DataFrame per user."""
        item_ids, ratings = np.asarray(item_ids), np.asarray(ratings)
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or len(lengths) == 0 or lengths.dtype.kind not in "iu" or lengths.min() < 1:
            raise ValueError(f"lengths must be one positive integer per user; received {lengths!r}.")
        if item_ids.shape != ratings.shape or item_ids.ndim != 1 or len(item_ids) != lengths.sum():
            raise ValueError(
                f"item_ids and ratings must be flat arrays of sum(lengths) = {int(lengths.sum())} "
                f"entries; received shapes {item_ids.shape} and {ratings.shape}."
            )
        idx = self._require_encoder().item_index(item_ids)
        return self.adapt_indices(idx, ratings, lengths, user_features,
                                  seen_items=np.split(item_ids, np.cumsum(lengths)[:-1]))

    def adapt_indices(self, item_index, ratings, lengths, user_features=None, seen_items=None):
        """``adapt_flat`` for items already encoded (``encoder.item_index``), as a server that
        validated them holds them. ``seen_items``: each user's raw ids (what ``recommend``
        excludes); by default the raw ids of ``item_index``."""
        encoder = self._require_encoder()
        item_index = np.asarray(item_index)
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or len(lengths) == 0 or lengths.dtype.kind not in "iu" or lengths.min() < 1:
            raise ValueError(f"lengths must be one positive integer per user; received {lengths!r}.")
        if item_index.ndim != 1 or item_index.dtype.kind not in "iu" or len(item_index) != lengths.sum():
            raise ValueError(f"item_index must be a flat integer array of sum(lengths) = "
                             f"{int(lengths.sum())} entries; received {item_index.dtype} {item_index.shape}.")
        if len(item_index) and (item_index.min() < 0 or item_index.max() >= encoder.num_items):
            raise ValueError(f"item_index values must lie in [0, {encoder.num_items}); received "
                             f"{item_index.min()}..{item_index.max()}.")
        y = encoder.check_ratings(ratings)
        if y.shape != item_index.shape:
            raise ValueError(f"ratings must match item_index; received shapes {y.shape} and {item_index.shape}.")
        if user_features is None:
            user_features = [{}] * len(lengths)
        if len(user_features) != len(lengths):
            raise ValueError(f"user_features has {len(user_features)} entries for {len(lengths)} users.")
        if seen_items is None:
            raw = encoder.item_ids
            seen_items = np.split(raw[item_index], np.cumsum(lengths)[:-1])
        padded, _, per_user = self._pad_supports(item_index, y, lengths, user_features)
        return self._adapt_padded(padded, per_user, seen_items)

    def _adapt_padded(self, padded, per_user, seen):
        inputs, target, mask = padded
        params, non_trainable = self._inference_weights()
        adapted = self._adapt_kernel()(params, non_trainable, inputs, target, mask)
        batch = _AdaptedBatch(list(adapted), len(per_user))
        return [AdaptedUser._from_batch(self, batch, u, per_user[u], seen[u]) for u in range(len(per_user))]

    def _inference_weights(self):
        """``snapshot()`` as plain tensors: on TensorFlow, a ``tf.function`` called with
        variables costs milliseconds per call more than one called with tensors."""
        # The same values as ``snapshot()``; the variable lists are kept, since walking the
        # layers for them costs more than the rest of a single-user request's bookkeeping.
        cached = self.__dict__.get("_variable_lists")
        if cached is None or cached[0] is not self.model:
            cached = (self.model, self.meta_variables, list(self.model.non_trainable_variables))
            self.__dict__["_variable_lists"] = cached
        _, meta, fixed = cached
        return backend.as_tensors([v.value for v in meta]), backend.as_tensors([v.value for v in fixed])

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
        return [encoder.item_index(np.asarray(c)) for c in candidates], False

    def score_many(self, adapted_users, candidates=None):
        """Scores of each user's candidates (raw item ids; None = whole catalogue)."""
        if not adapted_users:
            return []
        scores, sizes, _ = self._score_matrix(adapted_users, candidates)
        return [np.array(scores[u, : sizes[u]]) for u in range(len(adapted_users))]  # writable copies

    def score_indices(self, adapted_users, item_index):
        """``score_many`` for candidates already encoded (``encoder.item_index``): one int array
        shared by every user, or a list of one array per user."""
        if not adapted_users:
            return []
        n = len(adapted_users)
        if isinstance(item_index, np.ndarray):
            index, shared = item_index.astype(np.int32, copy=False), True
        else:
            if len(item_index) != n:
                raise ValueError(f"item_index has {len(item_index)} entries for {n} users.")
            index = [np.asarray(i, dtype=np.int32) for i in item_index]
            shared = n > 1 and _all_equal(index)
            if shared:
                index = index[0]
        scores, sizes, _ = self._score_matrix(adapted_users, None, (index, shared))
        return [np.array(scores[u, : sizes[u]]) for u in range(n)]

    def _score_matrix(self, adapted_users, candidates, encoded=None):
        """Scores as one padded array ``[users_bucket, candidates_bucket]``, each user's number
        of candidates, and whether all users share one candidate array."""
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
        encoder = self.encoder
        if shared:
            sizes = [len(index)] * n
            if candidates is not None or encoded is not None:
                # Padded to a bucket like per-user lists: a new list length must not
                # recompile (the catalogue's length is fixed per model, so it is not padded).
                index = np.concatenate([index, np.zeros(bucket(len(index), minimum=8) - len(index), np.int32)])
            items = encoder.item_inputs(index)
        else:
            sizes = [len(i) for i in index]
            c = bucket(max(sizes), minimum=8)
            padded = np.zeros((b, c), np.int32)
            for u, idx in enumerate(index):
                padded[u, : len(idx)] = idx
            items = encoder.item_inputs(padded)
        params, non_trainable = self._inference_weights()
        scores = backend.to_numpy(
            self._score_kernel(shared)(params, non_trainable, weights, users, items)
        )
        return scores, sizes, shared

    def recommend_many(self, adapted_users, k=10, exclude_seen=True, candidates=None):
        """Top-``k`` (item ids, scores) per user, best first; seen items excluded by default."""
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer; received k={k!r}.")
        if not adapted_users:
            return []
        n = len(adapted_users)
        scores, sizes, shared = self._score_matrix(adapted_users, candidates)
        scores = scores[:n].astype(np.float64)
        if candidates is None:
            ids = [self.encoder.item_ids[1:]] * n
        elif shared:
            ids = [np.asarray(candidates[0])] * n
        else:
            ids = [np.asarray(c) for c in candidates]
        # Padding columns and seen items can never be chosen.
        scores[np.arange(scores.shape[1])[None, :] >= np.asarray(sizes)[:, None]] = -np.inf
        if exclude_seen:
            _mask_seen(scores, ids, [u.seen_items for u in adapted_users])
        # One top-k over the whole matrix: partition, then sort the k kept per row.
        kk = min(int(k), scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        top_scores = np.take_along_axis(top_scores, order, axis=1)
        results = []
        for u in range(n):
            keep = np.isfinite(top_scores[u])
            results.append((ids[u][top[u][keep]], top_scores[u][keep].astype(np.float32)))
        return results

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
