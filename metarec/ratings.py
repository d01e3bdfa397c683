"""The rule of a valid rating, shared by the SDK and the server (numpy only, no Keras).

A rating is valid when it is finite and, for implicit feedback, exactly 0 or 1, or, for
explicit feedback with a rating range ``(low, high)``, inside ``[low, high]``.
:func:`ratings_valid` checks a whole array at once; :func:`first_bad_rating` names the first
rating that breaks the rule and why; :func:`describe_bad_rating` words it, the one wording that
the SDK, the data loader and the server all use; :func:`check_ratings` is the SDK's check
(``ValueError`` naming the first bad value).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["BadRating", "check_ratings", "describe_bad_rating", "first_bad_rating", "ratings_valid"]

#: Why a rating is refused (``BadRating.reason``).
NOT_FINITE, NOT_BINARY, OUT_OF_RANGE = "not_finite", "not_binary", "out_of_range"


class BadRating(NamedTuple):
    """The first refused rating: its position, its value and the broken part of the rule
    (``"not_finite"``, ``"not_binary"`` for implicit feedback, ``"out_of_range"``)."""

    position: int
    value: float
    reason: str


def _bad(ratings: np.ndarray, feedback: str, rating_range: Sequence[float] | None):
    """(reason, bool mask) of each part of the rule in turn, lazily."""
    yield NOT_FINITE, lambda: ~np.isfinite(ratings)
    if feedback == "implicit":
        yield NOT_BINARY, lambda: (ratings != 0.0) & (ratings != 1.0)
    elif rating_range is not None:
        low, high = rating_range
        yield OUT_OF_RANGE, lambda: (ratings < low) | (ratings > high)


def ratings_valid(ratings: np.ndarray, feedback: str, rating_range: Sequence[float] | None) -> bool:
    """Whether every rating is valid (one vectorised pass per part of the rule).

    Args:
        ratings: float array of any shape.
        feedback: ``"explicit"`` or ``"implicit"``.
        rating_range: ``(low, high)`` of explicit ratings, or ``None`` for no bounds.

    Returns:
        True when no rating would be refused.
    """
    ratings = np.asarray(ratings, dtype=np.float64)
    if not np.isfinite(ratings).all():
        return False
    if feedback == "implicit":
        return bool(((ratings == 0.0) | (ratings == 1.0)).all())
    if rating_range is not None and ratings.size:
        low, high = rating_range
        return bool(low <= ratings.min() and ratings.max() <= high)
    return True


def first_bad_rating(ratings: np.ndarray, feedback: str,
                     rating_range: Sequence[float] | None) -> BadRating | None:
    """The first refused rating, or ``None`` when all are valid.

    Non-finite ratings are reported before the others, then the first rating that breaks
    the feedback kind's rule (flat order).

    Args:
        ratings: float array of any shape (flattened).
        feedback: ``"explicit"`` or ``"implicit"``.
        rating_range: ``(low, high)`` of explicit ratings, or ``None`` for no bounds.

    Returns:
        A :class:`BadRating` (position, value as a Python float, reason), or ``None``.
    """
    ratings = np.ravel(np.asarray(ratings, dtype=np.float64))
    for reason, mask in _bad(ratings, feedback, rating_range):
        bad = np.flatnonzero(mask())
        if len(bad):
            return BadRating(int(bad[0]), ratings[bad[0]].item(), reason)
    return None


def describe_bad_rating(bad: BadRating, rating_range: Sequence[float] | None) -> str:
    """The error message for a refused rating (callers add where it was: a row, a request field).

    Args:
        bad: the refused rating, from :func:`first_bad_rating`.
        rating_range: the ``(low, high)`` that was checked (used for ``"out_of_range"``).

    Returns:
        For example ``"rating must be finite, got nan"``.
    """
    if bad.reason == NOT_FINITE:
        return f"rating must be finite, got {bad.value!r}"
    if bad.reason == NOT_BINARY:
        return f"implicit feedback needs a 0 or 1 label, got {bad.value!r}"
    low, high = rating_range
    return f"rating {bad.value!r} is outside the rating range [{low}, {high}]"


def check_ratings(ratings: Any, feedback: str, rating_range: Sequence[float] | None) -> np.ndarray:
    """Ratings as float32, checked; ``ValueError`` naming the first bad value otherwise.

    Args:
        ratings: numbers (array-like).
        feedback: ``"explicit"`` or ``"implicit"``.
        rating_range: ``(low, high)`` of explicit ratings, or ``None`` for no bounds.

    Returns:
        ``ratings`` as a float32 array of the same shape.
    """
    try:
        values = np.asarray(ratings, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        position, value = _first_non_number(ratings)
        raise ValueError(f"ratings must be numbers, got {value!r} at position {position}") from exc

    if not ratings_valid(values, feedback, rating_range):
        raise ValueError(describe_bad_rating(first_bad_rating(values, feedback, rating_range),
                                             rating_range))
    return values.astype(np.float32)


def _first_non_number(ratings: Any) -> tuple[int | None, Any]:
    """The position and value of the first rating that does not convert to a number."""
    for position, value in enumerate(np.ravel(np.asarray(ratings, dtype=object))):
        try:
            float(value)
        except (TypeError, ValueError):
            return position, value
    return None, None
