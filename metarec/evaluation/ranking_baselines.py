"""Catalogue-ranking baselines 6-9 of BENCHMARK.md: fold-in, no retraining, numpy / scipy only.

Each baseline is fitted on the meta-train users' binary user-item matrix and ranks the
catalogue for an unseen user from that user's support set alone ("fold-in"):

* :class:`MostPopular` (6): items by how many meta-train users interacted with them;
* :class:`EASE` (7): EASE^R, ``B = I - P diag(1 / diag(P))`` with
  ``P = (X^T X + lambda I)^-1``; a user's scores are their support row times ``B``;
* :class:`ItemKNN` (8): cosine item-item similarity, each item keeps its ``neighbours``
  most similar items; a candidate's score is the sum of its similarities to the support
  items that keep it as a neighbour;
* :class:`ImplicitALS` (9): weighted ALS (Hu, Koren & Volinsky 2008) with confidence
  ``1 + alpha`` on observed entries; item factors fitted on meta-train users, a user's
  factors by the exact weighted least-squares solve on their support (what the
  ``implicit`` package's ``recalculate_user`` computes).

The matrix is a hyper-parameter: ``"all-rated"`` (every rated item) or ``"liked"`` (items
rated at least ``relevance_threshold``, the protocol's relevance threshold). On implicit
data there is one matrix, ``"interactions"`` (label 1). With the liked matrix, a user with
no liked support item needs a ``fallback``, also chosen on validation users:
``"all-rated"`` folds in their whole support row instead, ``"popular"`` ranks by the liked
matrix's popularity.

Every hyper-parameter (matrix, fallback and the model's own) is chosen on the *validation*
users that ``fit`` receives, by catalogue Recall@20 exactly as protocol Q1 measures it:
every catalogue item not in the user's support is ranked, the relevant items are the query
items rated at least ``relevance_threshold`` (label 1 on implicit data). Test users never
reach ``fit``. The whole grid's validation scores are kept in ``tuning_results_``.

The outputs are ranking scores, not ratings (``predicts_ratings = False``): the protocol
reports no MAE / RMSE for them.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from metarec.evaluation.methods import Method, UserQuery
from metarec.metrics import catalogue_recall_at_k, rank_items

__all__ = [
    "DEFAULT_ALS_GRID",
    "DEFAULT_EASE_LAMBDAS",
    "DEFAULT_KNN_NEIGHBOURS",
    "EASE",
    "ImplicitALS",
    "ItemKNN",
    "MostPopular",
    "RankingBaseline",
    "als_fold_in",
]

#: EASE^R regularisation, log-spaced (half decades) from 10 to 100,000. With a few hundred
#: meta-train users the optimum is large: on MovieLens-100K (660 users, liked matrix)
#: validation picks 10,000-30,000.
DEFAULT_EASE_LAMBDAS = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0, 100000.0)
#: Neighbourhood sizes of item-kNN (``None``: every item).
DEFAULT_KNN_NEIGHBOURS = (10, 20, 50, 100, 200, 500, None)
#: ALS grid: factors x regularisation x alpha (16 points; one to two minutes on 2 cores for
#: MovieLens-100K, both matrices). A few hundred meta-train users need strong
#: regularisation and a small alpha: on MovieLens-100K (K = 10, liked matrix) validation
#: Recall@20 is 0.25-0.28 with regularization 10 and 0.33-0.34 with 30-100, alpha 0.5.
DEFAULT_ALS_GRID = tuple(
    {"factors": f, "regularization": r, "alpha": a}
    for f in (16, 32, 64, 128) for r in (30.0, 100.0) for a in (0.5, 2.0)
)
MATRICES = ("all-rated", "liked")
FALLBACKS = ("all-rated", "popular")
RECALL_K = 20


def _catalogue_of(encoder, dtype) -> np.ndarray:
    """The encoder's item ids (without the out-of-vocabulary row), typed like the data;
    the same catalogue, in the same order, as :class:`~metarec.evaluation.Q1Protocol` ranks."""
    ids = encoder.item_ids[1:]
    try:
        return np.asarray(ids.tolist(), dtype=dtype)
    except (TypeError, ValueError):
        return np.asarray(ids)


class RankingBaseline(Method):
    """Shared machinery of the fold-in ranking baselines: matrices, tuning, prediction.

    Subclasses define ``_model_grid`` (the model's own grid), ``_prepare(X)`` (work that
    depends on the matrix only), ``_build(state, params)`` (a model for one grid point) and
    ``_scores(model, R)`` (a ``(users, items)`` score array for support rows ``R``).

    Args:
        matrices: the matrices to try (subset of ``("all-rated", "liked")``; ignored on
            implicit data, which has only ``"interactions"``).
        fallbacks: what a user without a liked support item gets under the liked matrix
            (subset of ``("all-rated", "popular")``), chosen on validation users.
        relevance_threshold: rating that makes an item liked / relevant (Q1: 4).
    """

    deterministic = True
    is_baseline = True
    predicts_ratings = False

    def __init__(self, matrices: Sequence[str] = MATRICES, fallbacks: Sequence[str] = FALLBACKS,
                 relevance_threshold: float = 4.0) -> None:
        matrices, fallbacks = tuple(matrices), tuple(fallbacks)
        if not matrices or any(m not in MATRICES for m in matrices):
            raise ValueError(f"matrices must be a non-empty subset of {MATRICES}, got {matrices!r}")
        if not fallbacks or any(f not in FALLBACKS for f in fallbacks):
            raise ValueError(f"fallbacks must be a non-empty subset of {FALLBACKS}, got {fallbacks!r}")
        if not np.isfinite(relevance_threshold):
            raise ValueError(f"relevance_threshold must be finite, got {relevance_threshold!r}")
        self.matrices = matrices
        self.fallbacks = fallbacks
        self.relevance_threshold = float(relevance_threshold)
        self.params_: dict[str, Any] | None = None
        self.tuning_results_: pd.DataFrame | None = None
        self._cache_key: str | None = None
        self._cache: dict = {}

    # ------------------------------------------------------------------ subclass hooks
    def _model_grid(self) -> list[dict[str, Any]]:
        return [{}]

    def _prepare(self, X: sp.csr_matrix) -> Any:
        return X

    def _build(self, state: Any, params: dict[str, Any]) -> Any:
        return state

    def _scores(self, model: Any, R: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ matrices
    def _matrix_names(self) -> tuple[str, ...]:
        return ("interactions",) if self._implicit else self.matrices

    def _keep(self, ratings: np.ndarray, matrix: str) -> np.ndarray:
        if matrix == "interactions":
            return ratings == 1.0
        if matrix == "liked":
            return ratings >= self.relevance_threshold
        return np.ones(len(ratings), dtype=bool)

    def _support_rows(self, supports: Sequence[pd.DataFrame], matrix: str) -> np.ndarray:
        """Binary ``(users, items)`` rows of the supports under ``matrix`` (dense)."""
        R = np.zeros((len(supports), len(self._catalogue)), dtype=np.float64)
        for u, support in enumerate(supports):
            if support is None or not len(support):
                continue
            keep = self._keep(support["rating"].to_numpy(np.float64), matrix)
            columns = self._index.get_indexer(support["item_id"].to_numpy()[keep])
            R[u, columns[columns >= 0]] = 1.0
        return R

    def _state(self, matrix: str):
        if matrix not in self._cache:
            frame = self._train_frame
            keep = self._keep(frame["rating"].to_numpy(np.float64), matrix)
            rows = pd.factorize(frame["user_id"].to_numpy()[keep])[0]
            columns = self._index.get_indexer(frame["item_id"].to_numpy()[keep])
            ok = columns >= 0
            X = sp.csr_matrix((np.ones(int(ok.sum())), (rows[ok], columns[ok])),
                              shape=(int(rows.max()) + 1 if len(rows) else 0, len(self._catalogue)))
            X.data[:] = 1.0  # duplicates are summed by the constructor: back to binary
            if X.shape[0] == 0 or X.nnz == 0:
                raise ValueError(f"{self.name}: the {matrix!r} matrix of the training tasks is empty "
                                 f"(got {len(frame)} interactions, none kept)")
            self._cache[matrix] = {"X": X, "state": self._prepare(X),
                                   "popularity": np.asarray(X.sum(axis=0)).ravel(), "models": {}}
        return self._cache[matrix]

    def _model(self, matrix: str, params: dict[str, Any]):
        entry = self._state(matrix)
        key = tuple(sorted(params.items(), key=lambda kv: kv[0]))
        if key not in entry["models"]:
            entry["models"][key] = self._build(entry["state"], params)
        return entry["models"][key]

    def _score_users(self, supports: Sequence[pd.DataFrame], matrix: str, fallback: str | None,
                     params: dict[str, Any]) -> np.ndarray:
        """``(users, catalogue)`` scores for these supports under one full configuration."""
        model = self._model(matrix, params)
        R = self._support_rows(supports, matrix)
        scores = self._scores(model, R)
        empty = ~R.any(axis=1)
        if matrix == "liked" and empty.any():
            if fallback == "popular":
                scores[empty] = self._state(matrix)["popularity"][None, :]
            else:  # fold the user's whole support row into the same model
                rows = self._support_rows([supports[i] for i in np.flatnonzero(empty)], "all-rated")
                scores[empty] = self._scores(model, rows)
        return scores

    # ------------------------------------------------------------------ fit / tune
    def _configurations(self) -> list[dict[str, Any]]:
        out = []
        for matrix in self._matrix_names():
            for fallback in (self.fallbacks if matrix == "liked" else (None,)):
                for params in self._model_grid():
                    out.append({"matrix": matrix, "fallback": fallback, **params})
        return out

    def _default_configuration(self) -> dict[str, Any]:
        configurations = self._configurations()
        liked = [c for c in configurations if c["matrix"] in ("liked", "interactions")]
        return (liked or configurations)[0]

    def fit(self, train_tasks, val_tasks=None, seed: int = 0) -> RankingBaseline:
        """Build the matrices from ``train_tasks.frame()`` and choose every hyper-parameter
        on ``val_tasks`` by catalogue Recall@20. ``seed`` is ignored (deterministic).

        Models fitted on the same training interactions are reused across calls (the
        meta-train users are the same at every K), so refitting at another K only re-tunes.
        """
        del seed
        frame = train_tasks.frame()
        if len(frame) == 0:
            raise ValueError(f"{self.name}: the training tasks have no interactions: got an empty frame")
        schema = train_tasks.encoder.schema
        self._implicit = schema.feedback == "implicit"
        key = self._fingerprint(frame)
        if key != self._cache_key:
            self._cache_key, self._cache = key, {}
            self._train_frame = frame[["user_id", "item_id", "rating"]].copy()
            self._catalogue = _catalogue_of(train_tasks.encoder, frame["item_id"].dtype)
            self._index = pd.Index(self._catalogue)
        configurations = self._configurations()
        self.tuning_results_ = None
        if val_tasks is None or not len(val_tasks) or len(configurations) == 1:
            chosen = self._default_configuration()
        else:
            chosen = self._tune(val_tasks, configurations)
        self.params_ = chosen
        return self

    @staticmethod
    def _fingerprint(frame: pd.DataFrame) -> str:
        digest = hashlib.sha1()
        for column in ("user_id", "item_id", "rating"):
            digest.update(pd.util.hash_pandas_object(frame[column], index=False).to_numpy().tobytes())
        return digest.hexdigest()

    def _validation_users(self, val_tasks):
        supports, candidates, relevant = [], [], []
        for i in range(len(val_tasks)):
            support = val_tasks.support_frame(i)
            query = val_tasks.query_frame(i)
            ratings = query["rating"].to_numpy(np.float64)
            hit = ratings == 1.0 if self._implicit else ratings >= self.relevance_threshold
            supports.append(support)
            candidates.append(~self._index.isin(support["item_id"]))
            relevant.append(query["item_id"].to_numpy()[hit])
        return supports, candidates, relevant

    def validation_recall(self, scores: np.ndarray, candidates, relevant) -> float:
        """Mean catalogue Recall@20 over users with a relevant item (as protocol Q1)."""
        values = []
        for row, keep, rel in zip(scores, candidates, relevant):
            if not len(rel):
                continue
            ranked = rank_items(self._catalogue[keep], row[keep], k=RECALL_K)
            values.append(catalogue_recall_at_k(ranked, rel, RECALL_K))
        return float(np.mean(values)) if values else float("nan")

    def _tune(self, val_tasks, configurations) -> dict[str, Any]:
        supports, candidates, relevant = self._validation_users(val_tasks)
        rows = []
        for configuration in configurations:
            params = {k: v for k, v in configuration.items() if k not in ("matrix", "fallback")}
            scores = self._score_users(supports, configuration["matrix"], configuration["fallback"], params)
            rows.append({**configuration, "val_recall@20": self.validation_recall(scores, candidates, relevant)})
        self.tuning_results_ = pd.DataFrame(rows)
        values = self.tuning_results_["val_recall@20"].to_numpy()
        if not np.isfinite(values).any():
            return self._default_configuration()
        return configurations[int(np.nanargmax(values))]  # ties: the first grid point

    # ------------------------------------------------------------------ predict
    def get_params(self) -> dict[str, Any]:
        if self.params_ is None:
            return {}
        return {k: ("all" if k == "neighbours" and v is None else v)
                for k, v in self.params_.items() if not (k == "fallback" and v is None)}

    def catalogue_scores(self, supports: Sequence[pd.DataFrame]) -> np.ndarray:
        """``(users, catalogue items)`` scores of the fitted configuration, in the
        catalogue order of ``catalogue_``."""
        if self.params_ is None:
            raise ValueError(f"{self.name}: call fit before predict_many")
        params = {k: v for k, v in self.params_.items() if k not in ("matrix", "fallback")}
        return self._score_users(list(supports), self.params_["matrix"], self.params_["fallback"], params)

    @property
    def catalogue_(self) -> np.ndarray:
        if self.params_ is None:
            raise ValueError(f"{self.name}: call fit first")
        return self._catalogue

    def predict_many(self, users: Sequence[UserQuery]) -> list[np.ndarray]:
        """Scores of each user's ``item_ids`` (one matrix product for all users); items
        outside the catalogue score below every catalogue item."""
        if not len(users):
            if self.params_ is None:
                raise ValueError(f"{self.name}: call fit before predict_many")
            return []
        scores = self.catalogue_scores([u.support for u in users])
        out = []
        for row, user in zip(scores, users):
            positions = self._index.get_indexer(np.asarray(user.item_ids))
            floor = float(row.min()) - 1.0 if row.size else 0.0
            out.append(np.where(positions >= 0, row[np.maximum(positions, 0)], floor))
        return out


# --------------------------------------------------------------------------- 6
class MostPopular(RankingBaseline):
    """Baseline 6: items by the number of meta-train users who interacted with them (the
    matrix, all-rated or liked, chosen on validation users); the same list for everyone."""

    name = "most popular"

    def __init__(self, matrices: Sequence[str] = MATRICES, relevance_threshold: float = 4.0) -> None:
        super().__init__(matrices, ("all-rated",), relevance_threshold)

    def _prepare(self, X):
        return np.asarray(X.sum(axis=0), dtype=np.float64).ravel()

    def _scores(self, model, R):
        return np.repeat(model[None, :], R.shape[0], axis=0)

    def _configurations(self):
        return [{"matrix": m, "fallback": None} for m in self._matrix_names()]

    def _score_users(self, supports, matrix, fallback, params):
        return self._scores(self._model(matrix, params), np.zeros((len(supports), 0)))


# --------------------------------------------------------------------------- 7
class EASE(RankingBaseline):
    """Baseline 7: EASE^R (Steck 2019) fold-in; ``lambda`` chosen on validation users.

    ``B = I - P diag(1 / diag(P))``, ``P = (X^T X + lambda I)^-1``, so ``diag(B) = 0``; a
    user's scores are ``support row @ B``. Computed from one thin SVD of ``X`` per matrix
    (``P = (I - V diag(s^2 / (s^2 + lambda)) V^T) / lambda``), so every ``lambda`` of the
    grid costs one product with the users' rows, never an items x items inverse.

    Args:
        lambdas: the grid (each > 0).
    """

    name = "EASE"

    def __init__(self, lambdas: Sequence[float] = DEFAULT_EASE_LAMBDAS, matrices: Sequence[str] = MATRICES,
                 fallbacks: Sequence[str] = FALLBACKS, relevance_threshold: float = 4.0) -> None:
        lambdas = tuple(lambdas)
        if not lambdas:
            raise ValueError(f"lambdas must hold at least one value, got {lambdas!r}")
        for value in lambdas:
            if isinstance(value, bool) or not np.isfinite(value) or value <= 0:
                raise ValueError(f"EASE lambda must be a finite number > 0, got {value!r}")
        super().__init__(matrices, fallbacks, relevance_threshold)
        self.lambdas = tuple(float(v) for v in lambdas)

    def _model_grid(self):
        return [{"lambda": v} for v in self.lambdas]

    def _prepare(self, X):
        _, s, vt = np.linalg.svd(X.toarray(), full_matrices=False)
        return s, vt

    def _build(self, state, params):
        s, vt = state
        lam = params["lambda"]
        w = s**2 / (s**2 + lam)
        diag_p = (1.0 - (vt**2 * w[:, None]).sum(axis=0)) / lam
        return vt, w, lam, diag_p

    def _scores(self, model, R):
        vt, w, lam, diag_p = model
        rp = (R - ((R @ vt.T) * w) @ vt) / lam
        return R - rp / diag_p[None, :]

    def item_weights(self) -> np.ndarray:
        """The dense ``B`` (items x items) of the fitted configuration (for inspection)."""
        identity = np.eye(len(self.catalogue_))
        params = {"lambda": self.params_["lambda"]}
        return self._scores(self._model(self.params_["matrix"], params), identity)


# --------------------------------------------------------------------------- 8
class ItemKNN(RankingBaseline):
    """Baseline 8: item-kNN fold-in with cosine similarity on the binary matrix.

    ``sim(i, j) = |users(i) & users(j)| / sqrt(|users(i)| |users(j)|)`` (0 on the
    diagonal). Each item keeps its ``neighbours`` most similar items (``None``: all); a
    candidate's score is the sum of its similarities to the support items that keep it.
    Only the support items' similarity rows are ever computed.

    Args:
        neighbours: the grid of neighbourhood sizes (each an integer >= 1, or ``None``).
    """

    name = "item-kNN"

    def __init__(self, neighbours: Sequence[int | None] = DEFAULT_KNN_NEIGHBOURS,
                 matrices: Sequence[str] = MATRICES, fallbacks: Sequence[str] = FALLBACKS,
                 relevance_threshold: float = 4.0) -> None:
        neighbours = tuple(neighbours)
        if not neighbours:
            raise ValueError(f"neighbours must hold at least one size, got {neighbours!r}")
        for value in neighbours:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 1):
                raise ValueError(f"item-kNN neighbourhood size must be an integer >= 1 or None, got {value!r}")
        super().__init__(matrices, fallbacks, relevance_threshold)
        self.neighbours = tuple(None if v is None else int(v) for v in neighbours)

    def _model_grid(self):
        return [{"neighbours": v} for v in self.neighbours]

    def _prepare(self, X):
        Xc = X.tocsc()
        counts = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
        with np.errstate(divide="ignore"):
            inverse_norm = np.where(counts > 0, 1.0 / np.sqrt(counts), 0.0)
        return Xc, inverse_norm

    def _build(self, state, params):
        return state, params["neighbours"]

    def similarity_rows(self, state, items: np.ndarray, neighbours: int | None) -> np.ndarray:
        """Cosine similarity rows of ``items`` against every item, top ``neighbours`` kept."""
        Xc, inverse_norm = state
        rows = np.asarray((Xc[:, items].T @ Xc).todense(), dtype=np.float64)
        rows *= inverse_norm[items][:, None] * inverse_norm[None, :]
        rows[np.arange(len(items)), items] = 0.0
        if neighbours is not None and neighbours < rows.shape[1]:
            # Exactly `neighbours` per row; among equal similarities the lower item index wins.
            order = np.argsort(-rows, axis=1, kind="stable")[:, :neighbours]
            kept = np.zeros_like(rows)
            np.put_along_axis(kept, order, np.take_along_axis(rows, order, axis=1), axis=1)
            rows = kept
        return rows

    def _scores(self, model, R):
        state, neighbours = model
        items = np.flatnonzero(R.any(axis=0))
        if not len(items):
            return np.zeros_like(R)
        return R[:, items] @ self.similarity_rows(state, items, neighbours)


# --------------------------------------------------------------------------- 9
def _one_blas_thread():
    """Many small products and solves: a multi-threaded BLAS only adds overhead there (and
    oversubscribes a busy machine), so use one thread when ``threadpoolctl`` is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _als_solve(X: sp.csr_matrix, Y: np.ndarray, regularization: float, alpha: float,
               chunk: int = 512) -> np.ndarray:
    """Row factors minimising ``sum_i c_ri (p_ri - x_r . y_i)^2 + reg |x_r|^2`` for every row r
    of the binary ``X``, with ``p = X`` and ``c = 1 + alpha X`` (exact solves, batched)."""
    with _one_blas_thread():
        return _als_solve_rows(X, Y, regularization, alpha, chunk)


def _als_solve_rows(X, Y, regularization, alpha, chunk):
    factors = Y.shape[1]
    gram = Y.T @ Y + regularization * np.eye(factors)
    out = np.zeros((X.shape[0], factors))
    indptr, indices = X.indptr, X.indices
    for start in range(0, X.shape[0], chunk):
        stop = min(start + chunk, X.shape[0])
        A = np.repeat(gram[None], stop - start, axis=0)
        b = np.zeros((stop - start, factors))
        for r in range(start, stop):
            observed = Y[indices[indptr[r]:indptr[r + 1]]]
            if len(observed):
                A[r - start] += alpha * (observed.T @ observed)
                b[r - start] = (1.0 + alpha) * observed.sum(axis=0)
        out[start:stop] = np.linalg.solve(A, b[..., None])[..., 0]
    return out


def als_fold_in(support_rows, item_factors: np.ndarray, regularization: float, alpha: float) -> np.ndarray:
    """User factors for binary ``support_rows`` (users x items) given fixed item factors:
    the exact weighted least-squares solve of implicit ALS (``recalculate_user``)."""
    return _als_solve(sp.csr_matrix(np.asarray(support_rows, dtype=np.float64)), item_factors,
                      regularization, alpha)


class ImplicitALS(RankingBaseline):
    """Baseline 9: implicit-feedback ALS (Hu, Koren & Volinsky 2008) with fold-in.

    Item factors are fitted on the meta-train users' binary matrix (preference 1 on
    observed entries, confidence ``1 + alpha``; ``iterations`` alternating exact solves,
    initialised from ``seed``); a user's factors come from the exact solve on their support
    (:func:`als_fold_in`) and their scores are ``item_factors @ user_factors``. The seed is
    fixed at construction, so results do not depend on the evaluation seed.

    Args:
        grid: dicts with ``factors`` (int >= 1), ``regularization`` (>= 0) and ``alpha`` (>= 0).
        iterations: alternating least-squares sweeps.
        seed: seed of the initial factors.
    """

    name = "implicit ALS"

    def __init__(self, grid: Sequence[dict] = DEFAULT_ALS_GRID, iterations: int = 10, seed: int = 0,
                 matrices: Sequence[str] = MATRICES, fallbacks: Sequence[str] = FALLBACKS,
                 relevance_threshold: float = 4.0) -> None:
        grid = [dict(p) for p in grid]
        if not grid:
            raise ValueError(f"grid must hold at least one point, got {grid!r}")
        for point in grid:
            if set(point) != {"factors", "regularization", "alpha"}:
                raise ValueError(f"ALS grid points need factors, regularization and alpha, got {sorted(point)}")
            f = point["factors"]
            if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1:
                raise ValueError(f"ALS factors must be an integer >= 1, got {f!r}")
            for key in ("regularization", "alpha"):
                if not np.isfinite(point[key]) or point[key] < 0:
                    raise ValueError(f"ALS {key} must be a finite number >= 0, got {point[key]!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        super().__init__(matrices, fallbacks, relevance_threshold)
        self.grid = [{"factors": int(p["factors"]), "regularization": float(p["regularization"]),
                      "alpha": float(p["alpha"])} for p in grid]
        self.iterations = int(iterations)
        self.seed = int(seed)

    def _model_grid(self):
        return [dict(p) for p in self.grid]

    def _prepare(self, X):
        return X.tocsr(), X.T.tocsr()

    def _build(self, state, params):
        X, Xt = state
        rng = np.random.default_rng(self.seed)
        f, reg, alpha = params["factors"], params["regularization"], params["alpha"]
        items = rng.normal(0.0, 0.01, size=(X.shape[1], f))
        for _ in range(self.iterations):
            users = _als_solve(X, items, reg, alpha)
            items = _als_solve(Xt, users, reg, alpha)
        return items, reg, alpha

    def _scores(self, model, R):
        items, reg, alpha = model
        return als_fold_in(R, items, reg, alpha) @ items.T

    def get_params(self) -> dict[str, Any]:
        params = super().get_params()
        return {**params, "iterations": self.iterations, "seed": self.seed} if params else params
