"""Per-item priors: the fixed inputs of the residual presets.

``presets.residual_maml`` and ``presets.residual_memory`` predict a residual on top of a
fixed value per item; :func:`item_mean_prior` builds it from the training users' ratings::

    prior = metarec.priors.item_mean_prior(tasks)          # tasks: a UserTasks
    learner = metarec.presets.residual_maml(tasks.encoder, prior)

``models.two_tower`` starts from catalogue statistics of the training users:
:func:`cooccurrence_embeddings` (item vectors whose inner products are the liked-item
co-occurrence counts, truncated to a rank) and :func:`log_popularity` (the ranking bias).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from metarec.encoding import FeatureEncoder
from metarec.interactions import InteractionData
from metarec.tasks import TaskSet, UserTasks

__all__ = ["cooccurrence_embeddings", "item_mean_prior", "log_popularity"]


class _Frame:
    """The two things the item-mean statistics read from a task set: encoder and frame."""

    def __init__(self, encoder: FeatureEncoder, data: InteractionData) -> None:
        self.encoder = encoder
        self._data = data

    def frame(self):
        return self._data.interactions


def item_mean_prior(
    source: UserTasks | TaskSet | InteractionData,
    damping: float | None = None,
    val: TaskSet | None = None,
    encoder: FeatureEncoder | None = None,
) -> np.ndarray:
    """Damped item means, one per item index: the ``item_prior`` of the residual presets.

    ``prior[i] = (sum of item i's ratings + damping * global mean) / (count(i) + damping)``
    over the training ratings: a Bayesian average where the global mean counts as ``damping``
    pseudo-ratings. Index 0 (the unknown item) and items without a training rating get the
    global mean.

    Args:
        source: where the training ratings come from: a :class:`UserTasks` (its ``train``
            users; ``val`` defaults to its validation users), a :class:`TaskSet`, or an
            :class:`InteractionData` (every rating; needs ``encoder``).
        damping: pseudo-ratings of the global mean per item (>= 0). ``None``: chosen from
            ``(0, 1, 2, 5, 10, 20, 50, 100)`` by the per-user MAE on the query ratings of the
            ``val`` users, given their support; 5 when there are no validation users.
        val: validation users for choosing ``damping`` (never used for the means).
        encoder: the model's feature encoder, whose item indexes the prior follows; default
            the encoder of ``source`` (required for an ``InteractionData``).

    Returns:
        A float32 array of length ``encoder.num_items``, indexed by item index, as
        ``presets.residual_maml(encoder, item_prior)`` and ``models.residual_mlp`` take it.

    Raises:
        ValueError: on a source of another type, a negative or non-finite ``damping``, no
            encoder for an ``InteractionData``, or no training ratings.
    """
    from metarec.evaluation.methods import ItemMean

    if isinstance(source, UserTasks):
        train, val = source.train, source.val if val is None else val
    elif isinstance(source, TaskSet):
        train = source
    elif isinstance(source, InteractionData):
        if encoder is None:
            raise ValueError("item_mean_prior of an InteractionData needs encoder= (the model's "
                             "FeatureEncoder, whose item indexes the prior follows); got None.")
        train = _Frame(encoder, source)
    else:
        raise ValueError(f"item_mean_prior needs a UserTasks, TaskSet or InteractionData; got "
                         f"{type(source).__name__}.")
    if val is not None and not isinstance(val, TaskSet):
        raise ValueError(f"val must be a TaskSet; got {type(val).__name__}.")
    if damping is not None:
        if isinstance(damping, bool) or not isinstance(damping, (int, float, np.integer, np.floating)) \
                or not np.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite number >= 0; got {damping!r}.")
        val = None
    encoder = train.encoder if encoder is None else encoder
    if not isinstance(encoder, FeatureEncoder):
        raise ValueError(f"encoder must be a fitted FeatureEncoder; got {type(encoder).__name__}.")
    model = ItemMean() if damping is None else ItemMean(damping=float(damping), damping_grid=None)
    if not len(train.frame()):
        raise ValueError(f"item_mean_prior needs training ratings; got {type(source).__name__} "
                         "with no interactions.")
    model.fit(train, val)
    ids = encoder.item_ids[1:]
    prior = model._item_predictions(np.asarray(ids.tolist()), model.params["damping"])
    return np.concatenate([[model.global_mean_], prior]).astype(np.float32)


def _liked_matrix(train: TaskSet, relevance_threshold: float | None):
    """The training users' binary user x item matrix (scipy CSR, items by index), of liked
    interactions (rating >= threshold; every interaction for implicit data or no threshold)."""
    from scipy import sparse

    frame = train.frame()
    encoder = train.encoder
    if relevance_threshold is not None and encoder.schema.feedback == "explicit":
        frame = frame[frame["rating"] >= relevance_threshold]
    else:
        frame = frame[frame["rating"] > 0]
    items = encoder.item_index(frame["item_id"].to_numpy())
    # Rows by the users' own ids: users the encoder does not know must stay apart.
    users, uniques = pd.factorize(frame["user_id"])
    x = sparse.csr_matrix((np.ones(len(items)), (users, items)),
                          shape=(max(len(uniques), 1), encoder.num_items))
    x.data[:] = 1.0
    return x


def _train_set(source: UserTasks | TaskSet) -> TaskSet:
    if isinstance(source, UserTasks):
        return source.train
    if isinstance(source, TaskSet):
        return source
    raise ValueError(f"expected a UserTasks or TaskSet of training users; got {type(source).__name__}.")


def cooccurrence_embeddings(source: UserTasks | TaskSet, dim: int,
                            relevance_threshold: float | None = 4.0, scale: float = 3.0,
                            cosine_dim: int = 0, cosine_scale: float = 5.0) -> np.ndarray:
    """Item vectors whose inner products approximate how often two items are liked together.

    With ``X`` the training users' binary matrix of liked items, ``C = X^T X`` is factorised
    exactly by its top ``dim`` eigenvectors: ``E = V sqrt(lambda)``, so ``E E^T`` is the best
    rank-``dim`` approximation of ``C``. Rows are then scaled so that the longest has norm
    ``scale``. A two-tower model started from them ranks, after one "linear" inner step on a
    user's support (see ``CatalogueObjective(inner_loss="linear")``), by the co-occurrence of
    each item with the support items: the fold-in that EASE^R and item-kNN use, at low rank;
    meta-training then tunes it.

    With ``cosine_dim > 0`` the last ``cosine_dim`` of the ``dim`` columns factorise the cosine
    item-item similarity of the same matrix instead (zero diagonal, top eigenvectors, longest
    row scaled to ``cosine_scale``): the two parts' inner products add up, co-occurrence
    counts (which favour popular items) plus item-kNN's normalised similarity.

    Args:
        source: the training users (a ``UserTasks``: its ``train`` set; or a ``TaskSet``).
        dim: the rank (the model's ``embedding_dim``), at most the number of items.
        relevance_threshold: ratings at or above it count as liked (explicit data); None or
            implicit data: every interaction.
        scale: the norm of the longest row (> 0).
        cosine_dim: columns given to the cosine similarity (0 <= cosine_dim < dim).
        cosine_scale: the norm of the longest row of the cosine part (> 0).

    Returns:
        float32 ``[encoder.num_items, dim]`` (row 0, the unknown item, is zero).
    """
    train = _train_set(source)
    num_items = train.encoder.num_items
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= num_items:
        raise ValueError(f"dim must be an integer in [1, {num_items}]; got dim={dim!r}.")
    if not (isinstance(scale, (int, float, np.floating)) and np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0; got scale={scale!r}.")
    if isinstance(cosine_dim, bool) or not isinstance(cosine_dim, (int, np.integer)) or not 0 <= cosine_dim < dim:
        raise ValueError(f"cosine_dim must be an integer in [0, dim={dim}); got cosine_dim={cosine_dim!r}.")
    if not (isinstance(cosine_scale, (int, float, np.floating)) and np.isfinite(cosine_scale) and cosine_scale > 0):
        raise ValueError(f"cosine_scale must be a finite number > 0; got cosine_scale={cosine_scale!r}.")
    x = _liked_matrix(train, relevance_threshold)
    if x.nnz == 0:
        raise ValueError("the training users have no liked interaction to count; got "
                         f"relevance_threshold={relevance_threshold!r}.")
    c = (x.T @ x).toarray().astype(np.float64)
    parts = [_top_factors(c, dim - cosine_dim, scale)]
    if cosine_dim:
        norms = np.sqrt(np.diag(c))
        norms[norms == 0] = 1.0
        cosine = c / norms[:, None] / norms[None, :]
        np.fill_diagonal(cosine, 0.0)
        parts.append(_top_factors(cosine, cosine_dim, cosine_scale))
    e = np.concatenate(parts, axis=1)
    e[0] = 0.0
    return e.astype(np.float32)


def _top_factors(matrix: np.ndarray, dim: int, scale: float) -> np.ndarray:
    """``V sqrt(max(lambda, 0))`` of the ``dim`` largest eigenvalues of a symmetric matrix,
    rows scaled so that the longest has norm ``scale``."""
    n = len(matrix)
    if n > 2000 and dim < n // 4:
        # A large catalogue: the top eigenpairs alone (Lanczos), from a fixed start vector so
        # that the result does not depend on a random draw.
        from scipy.sparse.linalg import eigsh

        values, vectors = eigsh(matrix, k=dim, which="LA", v0=np.ones(n) / np.sqrt(n))
    else:
        values, vectors = np.linalg.eigh(matrix)
    top = np.argsort(-values)[:dim]
    e = vectors[:, top] * np.sqrt(np.maximum(values[top], 0.0))
    longest = np.linalg.norm(e, axis=1).max()
    if longest > 0:
        e *= scale / longest
    return e


def log_popularity(source: UserTasks | TaskSet, relevance_threshold: float | None = 4.0) -> np.ndarray:
    """Centred ``log(1 + liked count)`` per item index: a ranking bias that, before any
    adaptation, ranks the catalogue as "most popular (liked)" does.

    Args:
        source: the training users (``UserTasks`` or ``TaskSet``).
        relevance_threshold: as in :func:`cooccurrence_embeddings`.

    Returns:
        float32 ``[encoder.num_items]``.
    """
    x = _liked_matrix(_train_set(source), relevance_threshold)
    counts = np.asarray(x.sum(axis=0)).ravel()
    prior = np.log1p(counts)
    prior[1:] -= prior[1:].mean()
    prior[0] = prior[1:].min() if len(prior) > 1 else 0.0
    return prior.astype(np.float32)
