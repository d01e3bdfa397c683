"""A synthetic cold-start data set where per-user adaptation provably has something to learn.

Each user has a latent taste vector; only part of it shows in their features (a categorical
``segment`` from the signs of the first two latent dimensions, a numeric ``age`` correlated
with the third). The remaining dimensions and a per-user bias are visible only through the
user's own ratings, so a model that adapts to a user's support set can beat any model that
sees features alone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from metarec.interactions import InteractionData
from metarec.schema import infer_schema

GENRES = ("action", "comedy", "drama", "horror", "romance", "scifi", "thriller", "documentary")


def synthetic(
    num_users: int = 600,
    num_items: int = 400,
    interactions_per_user: tuple[int, int] = (20, 80),
    feedback: str = "explicit",
    seed: int = 0,
    latent_dim: int = 8,
    noise: float = 0.4,
) -> InteractionData:
    """Generate a deterministic synthetic :class:`InteractionData`.

    Args:
        num_users, num_items: sizes; ids are ints ``1..num_users`` / ``1..num_items``.
        interactions_per_user: inclusive (low, high) range of each user's number of
            interactions (capped at ``num_items``); items are drawn without replacement,
            more popular items more often.
        feedback: ``"explicit"`` (ratings 1..5: clipped round of bias + user·item + noise)
            or ``"implicit"`` (Bernoulli 0/1 labels with the same score as logit).
        seed: everything is a function of the seed.
        latent_dim: taste dimensions (>= 4); dimensions 3.. are invisible in user features.
        noise: standard deviation of the rating noise.

    User features: ``segment`` (categorical), ``age`` (numeric). Item features: ``genres``
    (multi-hot, tied to the first four latent dimensions), ``year`` and ``popularity``
    (numeric, a noisy view of the item bias). Users with larger ids arrive later, and each
    user's timestamps increase, so ``user_split="time"`` puts the last users in the test set.
    """
    if num_users < 1 or num_items < 1:
        raise ValueError(f"num_users and num_items must be >= 1, got {num_users!r}, {num_items!r}")
    low, high = (int(v) for v in interactions_per_user)
    if not 1 <= low <= high:
        raise ValueError(f"interactions_per_user must be (low, high) with 1 <= low <= high, "
                         f"got {interactions_per_user!r}")
    if feedback not in ("explicit", "implicit"):
        raise ValueError(f"feedback must be 'explicit' or 'implicit', got {feedback!r}")
    if latent_dim < 4:
        raise ValueError(f"latent_dim must be >= 4, got {latent_dim!r}")
    rng = np.random.default_rng(seed)

    # Users: latent taste, hidden bias, and features that reveal only part of the taste.
    user_latent = rng.normal(size=(num_users, latent_dim))
    user_bias = rng.normal(scale=0.35, size=num_users)
    segment_code = (user_latent[:, 0] > 0).astype(int) * 2 + (user_latent[:, 1] > 0).astype(int)
    flip = rng.random(num_users) < 0.1  # segments are a noisy label, as in real data
    segment_code[flip] = rng.integers(0, 4, size=int(flip.sum()))
    age = np.clip(np.round(38 + 10 * user_latent[:, 2] + rng.normal(scale=4, size=num_users)), 15, 80)
    users = pd.DataFrame({
        "segment": [f"segment_{c}" for c in segment_code],
        "age": age.astype(np.int64),
    }, index=pd.Index(np.arange(1, num_users + 1), name="user_id"))

    # Items: latent vector, bias; genres reflect latent dims 0..3 (one genre per sign).
    item_latent = rng.normal(size=(num_items, latent_dim))
    item_bias = rng.normal(scale=0.5, size=num_items)
    genre_matrix = np.zeros((num_items, len(GENRES)), dtype=bool)
    for j in range(4):
        genre_matrix[:, 2 * j] = item_latent[:, j] + rng.normal(scale=0.5, size=num_items) > 0.6
        genre_matrix[:, 2 * j + 1] = item_latent[:, j] + rng.normal(scale=0.5, size=num_items) < -0.6
    empty = ~genre_matrix.any(axis=1)
    genre_matrix[np.flatnonzero(empty), rng.integers(0, len(GENRES), size=int(empty.sum()))] = True
    items = pd.DataFrame({
        "genres": [[GENRES[g] for g in np.flatnonzero(row)] for row in genre_matrix],
        "year": rng.integers(1970, 2021, size=num_items).astype(np.int64),
        "popularity": np.round(item_bias + rng.normal(scale=0.2, size=num_items), 3),
    }, index=pd.Index(np.arange(1, num_items + 1), name="item_id"))

    # Interactions: popular items are seen more; arrival time grows with the user id.
    counts = rng.integers(low, high + 1, size=num_users).clip(max=num_items)
    pick_p = np.exp(0.8 * item_bias)
    pick_p /= pick_p.sum()
    arrival = np.sort(rng.uniform(0, 3.0e7, size=num_users)).astype(np.int64) + 1_000_000_000
    user_col, item_col, time_col = [], [], []
    for u in range(num_users):
        chosen = rng.choice(num_items, size=counts[u], replace=False, p=pick_p)
        gaps = rng.exponential(scale=6 * 3600, size=counts[u]).astype(np.int64) + 1
        user_col.append(np.full(counts[u], u))
        item_col.append(chosen)
        # The first interaction happens on arrival, so first timestamps follow the user order.
        time_col.append(arrival[u] + np.cumsum(gaps) - gaps[0])
    u_idx, i_idx = np.concatenate(user_col), np.concatenate(item_col)
    affinity = np.einsum("nd,nd->n", user_latent[u_idx], item_latent[i_idx]) / np.sqrt(latent_dim)
    score = user_bias[u_idx] + item_bias[i_idx] + affinity
    if feedback == "explicit":
        raw = 3.4 + score + rng.normal(scale=noise, size=score.shape)
        rating = np.clip(np.round(raw), 1, 5)
        rating_range = (1.0, 5.0)
    else:
        rating = (rng.random(score.shape) < 1.0 / (1.0 + np.exp(-2.0 * score))).astype(np.float64)
        rating_range = None
    interactions = pd.DataFrame({
        "user_id": u_idx + 1,
        "item_id": i_idx + 1,
        "rating": rating,
        "timestamp": np.concatenate(time_col),
    })
    schema = infer_schema(interactions, users, items, feedback=feedback, rating_range=rating_range)
    return InteractionData(interactions, users, items, schema=schema)
