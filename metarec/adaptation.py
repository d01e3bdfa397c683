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
from metarec.ranking import bucket, support_bucket


def check_item_index(index, num_items):
    """``ValueError`` unless ``index`` is a flat integer array of item indices in
    ``[0, num_items)`` (0 is the unknown item); returns it as int32."""
    index = np.asarray(index)
    if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
        raise ValueError(f"item_index must be a flat integer array; got {index.dtype} {index.shape}.")
    if index.size and (index.min() < 0 or index.max() >= num_items):
        raise ValueError(f"item_index values must lie in [0, {num_items}); got "
                         f"{index.min()}..{index.max()}.")
    return index.astype(np.int32, copy=False)


def _encode_interactions(encoder, supports, raw_items=None):
    """``encoder.encode_interactions`` of each frame, in one call where the frames agree.

    The encoding is element-wise, so one call on the concatenated columns gives the same
    arrays. The frames are joined with one ``pd.concat`` (reading two columns of each of
    1,000 frames costs twice as much). Where the joined columns do not have one id type
    (integers, or strings) and numeric ratings, or on any error, each frame is encoded alone
    (which also raises exactly that frame's error). ``raw_items``, a list, receives each
    frame's raw item ids.
    """
    if len(supports) > 1:
        try:
            lengths = [len(frame) for frame in supports]
            joined = pd.concat(supports, ignore_index=True, sort=False)
            items, ratings = joined["item_id"], joined["rating"]
        except (KeyError, TypeError, ValueError, AttributeError, pd.errors.InvalidIndexError):
            items = None
        if items is not None and _one_id_type(items.dtype) and ratings.dtype.kind in "iuf":
            try:
                idx, y = encoder.encode_interactions(pd.DataFrame({"item_id": items, "rating": ratings}))
            except ValueError:
                pass
            else:
                bounds = np.cumsum(lengths)[:-1]
                if raw_items is not None:
                    raw_items.extend(np.split(items.to_numpy(), bounds))
                return list(zip(np.split(idx, bounds), np.split(y, bounds)))
    encoded = [encoder.encode_interactions(frame) for frame in supports]
    if raw_items is not None:
        raw_items.extend(np.asarray(frame["item_id"]) for frame in supports)
    return encoded


def _one_id_type(dtype) -> bool:
    """Integer ids, or string ids (a pandas string dtype): a join of frames with ids of
    different kinds is ``object`` or float, and those frames are encoded one by one."""
    return dtype.kind in "iu" or (dtype != object and pd.api.types.is_string_dtype(dtype))


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
    """``adapt`` / ``adapt_many`` / ``adapt_flat`` / ``adapt_indices`` for ``MetaLearner``, and
    the compiled-kernel cache the scoring side (``metarec.scoring``) shares."""

    #: Attributes that the compiled kernels read as constants while tracing; the kernel cache
    #: is keyed on their current values. Each learner class lists its own.
    TRACED_SETTINGS = ()

    # ------------------------------------------------------------------ encoding requests
    def _require_encoder(self):
        if self.encoder is None:
            raise ValueError(
                "This learner has no feature encoder: fit it on a TaskSet, or pass encoder=."
            )
        return self.encoder

    def encode_supports(self, supports, user_features=None, raw_items=None):
        """Pad users' support frames into arrays ``[B_bucket, S_bucket]``; returns the arrays,
        the users' encoded features stacked, and each user's feature dict. ``raw_items``, a
        list, receives each frame's raw item ids."""
        encoder = self._require_encoder()
        if isinstance(supports, pd.DataFrame):
            raise ValueError("supports must be a list of DataFrames, one per user; got one DataFrame.")
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
        encoded = _encode_interactions(encoder, supports, raw_items)
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
        if all(key == keys[0] for key in keys):
            # One row for every user (often: no features at all): repeat it, skipping
            # np.stack's per-row work.
            return {k: np.repeat(v[None], len(got), axis=0) for k, v in got[0].items()}
        return {k: np.stack([r[k] for r in got]) for k in got[0]}

    # ------------------------------------------------------------------ compiled kernels
    def release_kernels(self):
        """Drop the compiled adaptation, scoring and evaluation kernels; they are rebuilt on
        the next call. Each combination of settings (``TRACED_SETTINGS``: ``inner_steps``,
        ``inner_lr``, ...) keeps its own compiled program, so a sweep over settings should
        release them as it goes."""
        self.__dict__.get("_kernel_cache", {}).clear()

    def _kernel(self, name, build):
        # Settings are read as Python constants while tracing: key the cache on every one of
        # them (the learner's ``TRACED_SETTINGS`` and the adapted weights' positions), so a
        # changed setting (``inner_lr``, ``clipnorm``, ``first_order``, ...) takes effect.
        settings = tuple(getattr(self, attr, None) for attr in self.TRACED_SETTINGS)
        key = (name, settings, tuple(self.forward.adapt_index))
        cache = self.__dict__.setdefault("_kernel_cache", {})
        if key not in cache:
            cache[key] = backend.jit(build(), xla=_XLA)
        return cache[key]

    def _adapt_fn(self):
        """The pure adaptation of a padded batch of users: (params, non_trainable, inputs,
        target, mask) -> adapted weights stacked ``[users, ...]``.

        A catalogue objective's adaptation negatives (one fixed draw, or the whole catalogue)
        are constants of the compiled program."""
        objective = getattr(self, "objective", None)
        negatives = None
        if objective is not None and objective.inner_loss == "softmax":
            negatives = self._negative_inputs(objective.sampler.inference_draw())

        def fn(params, non_trainable, inputs, target, mask):
            if self.inner_steps == 0 and not self.reads_support:
                # Nothing to adapt: every user gets the initialisation. (Mapping a function
                # that ignores its mapped inputs fails under tf.vectorized_map.)
                adapted, _ = self.initial_weights(params)
                users = ops.shape(target)[0]
                return [ops.broadcast_to(w[None], (users,) + tuple(w.shape)) for w in adapted]

            def one(params, non_trainable, context, inputs, target, mask):
                adapted, _ = self.adapt_user(
                    params, non_trainable, inputs, target, mask, context=context,
                    negatives=negatives,
                )
                return adapted

            return self.map_users(one, params, non_trainable, inputs, target, mask)

        return fn

    def _adapt_kernel(self):
        return self._kernel("adapt", self._adapt_fn)

    # ------------------------------------------------------------------ public API
    def adapt(self, interactions, user_features=None):
        """Adapt the meta-model to one user's few interactions (a DataFrame with ``item_id`` and
        ``rating``); returns an ``AdaptedUser`` with ``score`` and ``recommend``."""
        return self.adapt_many([interactions], None if user_features is None else [user_features])[0]

    def adapt_many(self, supports, user_features=None):
        """Adapt to many users at once (one vectorised, compiled call per bucket of users)."""
        seen = []
        padded, _, per_user = self.encode_supports(supports, user_features, raw_items=seen)
        return self._adapt_padded(padded, per_user, seen)

    def adapt_flat(self, item_ids, ratings, lengths, user_features=None):
        """``adapt_many`` for interactions given as flat arrays, the way a batch job holds them:
        user ``u``'s support is the next ``lengths[u]`` entries of ``item_ids`` / ``ratings``
        (raw item ids and ratings, checked as ``adapt_many`` checks them). Faster than building
        one DataFrame per user."""
        item_ids, ratings = np.asarray(item_ids), np.asarray(ratings)
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or len(lengths) == 0 or lengths.dtype.kind not in "iu" or lengths.min() < 0:
            raise ValueError(f"lengths must be one integer >= 0 per user (0: a user with no "
                             f"interactions yet, served by the meta-learned start); got {lengths!r}.")
        if item_ids.shape != ratings.shape or item_ids.ndim != 1 or len(item_ids) != lengths.sum():
            raise ValueError(
                f"item_ids and ratings must be flat arrays of sum(lengths) = {int(lengths.sum())} "
                f"entries; got shapes {item_ids.shape} and {ratings.shape}."
            )
        idx = self._require_encoder().item_index(item_ids)
        return self.adapt_indices(idx, ratings, lengths, user_features,
                                  seen_items=np.split(item_ids, np.cumsum(lengths)[:-1]))

    def adapt_indices(self, item_index, ratings, lengths, user_features=None, seen_items=None,
                      ratings_checked=False):
        """``adapt_flat`` for items already encoded (``encoder.item_index``), as a server that
        validated them holds them. ``seen_items``: each user's raw ids (what ``recommend``
        excludes); by default the raw ids of ``item_index``. ``ratings_checked=True``: the
        caller has already checked the ratings by ``metarec.ratings`` (as the server's request
        validation does), and they are not checked again."""
        padded, _, per_user, seen_items = self._padded_indices(
            item_index, ratings, lengths, user_features, seen_items, ratings_checked)
        return self._adapt_padded(padded, per_user, seen_items)

    def _padded_indices(self, item_index, ratings, lengths, user_features, seen_items,
                        ratings_checked=False):
        """``adapt_indices``'s checks and padding: (padded support, stacked user inputs,
        per-user inputs, seen items); the ratings are checked unless ``ratings_checked``."""
        encoder = self._require_encoder()
        item_index = np.asarray(item_index)
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or len(lengths) == 0 or lengths.dtype.kind not in "iu" or lengths.min() < 0:
            raise ValueError(f"lengths must be one integer >= 0 per user (0: a user with no "
                             f"interactions yet, served by the meta-learned start); got {lengths!r}.")
        check_item_index(item_index, encoder.num_items)
        if len(item_index) != lengths.sum():
            raise ValueError(f"item_index must hold sum(lengths) = {int(lengths.sum())} entries; "
                             f"got {len(item_index)}.")
        y = np.asarray(ratings, np.float32) if ratings_checked else encoder.check_ratings(ratings)
        if y.shape != item_index.shape:
            raise ValueError(f"ratings must match item_index; got shapes {y.shape} and {item_index.shape}.")
        if user_features is None:
            user_features = [{}] * len(lengths)
        if len(user_features) != len(lengths):
            raise ValueError(f"user_features has {len(user_features)} entries for {len(lengths)} users.")
        if seen_items is None:
            raw = encoder.item_ids
            seen_items = np.split(raw[item_index], np.cumsum(lengths)[:-1])
        padded, users, per_user = self._pad_supports(item_index, y, lengths, user_features)
        return padded, users, per_user, seen_items

    def _adapt_padded(self, padded, per_user, seen):
        inputs, target, mask = padded
        params, non_trainable = self._inference_weights()
        adapted = self._adapt_kernel()(params, non_trainable, inputs, target, mask)
        return self._users_of_batch(adapted, per_user, seen)

    def _users_of_batch(self, adapted, per_user, seen):
        """One ``AdaptedUser`` per real user of a compiled call's stacked adapted weights."""
        batch = _AdaptedBatch(list(adapted), len(per_user))
        return [AdaptedUser._from_batch(self, batch, u, per_user[u], seen[u]) for u in range(len(per_user))]

    def _inference_weights(self):
        """The weights of ``snapshot()`` as the compiled kernels take them
        (``backend.kernel_weights``): read when the kernel runs."""
        # The variable lists are kept, since walking the
        # layers for them costs more than the rest of a single-user request's bookkeeping.
        cached = self.__dict__.get("_variable_lists")
        if cached is None or cached[0] is not self.model:
            cached = (self.model, self.meta_variables, list(self.model.non_trainable_variables))
            self.__dict__["_variable_lists"] = cached
        _, meta, fixed = cached
        return backend.kernel_weights([v.value for v in meta]), backend.kernel_weights([v.value for v in fixed])
