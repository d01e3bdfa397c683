"""What to do with ids and feature names a model does not know, and how to say so.

The server refuses a request that names an item outside the served model's catalogue or a
user feature the model lacks (``INVALID_ARGUMENT``); the SDK and ``metarec score-batch``
follow an ``unknown_ids=`` policy instead:

* ``"error"``: ``ValueError``, with the server's message;
* ``"warn"`` (the default): an :class:`UnknownIdsWarning` with the same message, counts
  included, and the call goes on: unknown items map to the out-of-vocabulary row (the model's
  "an item we know nothing about") and unknown feature names are dropped;
* ``"ignore"``: the call goes on without a word.

The messages are built here and nowhere else, so the SDK's and the server's read the same.
An id of the wrong type is the usual cause of a whole column of unknown ids (``"61"`` against
a catalogue of integer ids): the message then says so and how to convert them.

Numpy only: no Keras.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "UNKNOWN_ID_POLICIES",
    "UnknownIdsWarning",
    "apply_policy",
    "check_policy",
    "unknown_features_message",
    "unknown_items_message",
]

UNKNOWN_ID_POLICIES = ("error", "warn", "ignore")
#: How many unknown ids a message quotes.
QUOTED = 5


class UnknownIdsWarning(UserWarning):
    """Ids or feature names unknown to the model were used (``unknown_ids="warn"``)."""


def check_policy(policy: str) -> str:
    """``policy`` when it is one of :data:`UNKNOWN_ID_POLICIES`, else ``ValueError``.

    Args:
        policy: ``"error"``, ``"warn"`` or ``"ignore"``.

    Returns:
        ``policy``.
    """
    if policy not in UNKNOWN_ID_POLICIES:
        raise ValueError(f"unknown_ids must be one of {UNKNOWN_ID_POLICIES}; got unknown_ids={policy!r}.")
    return policy


def unknown_items_message(what: str, unknown: Sequence[Any], count: int | None = None,
                          catalogue_ids: Iterable[Any] | None = None) -> str:
    """``"N <what> item id(s) unknown to the model's catalogue: 'a', 'b' ..."``.

    Args:
        what: ``"interaction"`` or ``"candidate"``.
        unknown: the unknown ids (the first :data:`QUOTED` are quoted, in order).
        count: how many there are (default: ``len(unknown)``).
        catalogue_ids: the catalogue's raw ids; when they are integers and unknown ids are
            strings of integers, the message adds how to convert them.

    Returns:
        The message.
    """
    count = len(unknown) if count is None else count
    names = ", ".join(repr(_plain(v)) for v in list(unknown)[:QUOTED])
    message = (f"{count} {what} item id(s) unknown to the model's catalogue: {names}"
               + (" ..." if count > QUOTED else ""))
    return message + _type_hint(unknown, catalogue_ids)


def unknown_features_message(names: Sequence[str], known: Iterable[str]) -> str:
    """``"unknown user feature 'x' (the model knows: age, segment)"`` (several names: all).

    Args:
        names: the unknown feature names.
        known: the model's user feature names.

    Returns:
        The message.
    """
    known = ", ".join(sorted(known)) or "none"
    if len(names) == 1:
        return f"unknown user feature {names[0]!r} (the model knows: {known})"
    quoted = ", ".join(repr(n) for n in names)
    return f"unknown user features {quoted} (the model knows: {known})"


def apply_policy(policy: str, message: str) -> None:
    """``ValueError(message)`` for ``"error"``, an :class:`UnknownIdsWarning` for ``"warn"``
    (attributed to the first caller outside metarec), nothing for ``"ignore"``.

    Args:
        policy: one of :data:`UNKNOWN_ID_POLICIES`.
        message: what was unknown (from the functions above).
    """
    check_policy(policy)
    if policy == "error":
        raise ValueError(message + ". Fix the ids, or pass unknown_ids='warn' or 'ignore' to "
                                   "score them as unknown items.")
    if policy == "warn":
        warnings.warn(message + " (scored as unknown; unknown_ids='error' refuses them, "
                                "'ignore' says nothing)", UnknownIdsWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside the metarec package (the user's call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _type_hint(unknown: Sequence[Any], catalogue_ids: Iterable[Any] | None) -> str:
    """How to convert string ids of integers for a catalogue of integer ids ('' otherwise)."""
    if catalogue_ids is None:
        return ""
    known = [v for v in catalogue_ids if v is not None]
    if not known or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in known):
        return ""
    strings = [v for v in unknown if isinstance(v, str) and v.strip().lstrip("-").isdigit()]
    if not strings:
        return ""
    known_set = set(int(v) for v in known)
    matching = [v for v in strings if int(v) in known_set]
    if not matching:
        return ""
    return (f"; the catalogue's ids are integers and {len(matching)} of these are strings of "
            f"known integer ids (e.g. {matching[0]!r} for {int(matching[0])}): convert them, "
            f"e.g. frame['item_id'].astype(int)")
