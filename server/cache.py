"""Bounded LRU cache of adapted users.

Adapting to a user costs a few inner gradient steps; scoring with the result is cheap. A
client that asks again for the same user with the same interactions (paging, re-ranking a new
candidate list) gets the cached adapted weights. The key holds a digest of everything the
adaptation depends on (interactions in order, user features) and the model name and version,
so new interactions or a hot-swapped model never reuse stale weights.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple


class CacheKey(NamedTuple):
    user_id: str
    digest: bytes
    model_name: str
    model_version: int


def interactions_digest(
    interactions: Sequence[tuple[str, float, int | None]],
    user_features: Mapping[str, Any] | None = None,
) -> bytes:
    """A 16-byte digest of ``(item_id, rating, timestamp)`` rows and user features.

    Order matters (adaptation may depend on it); float ratings are hashed by their exact
    bits, so 4.0 and 4.000001 differ. Every field is length-prefixed so no two different
    inputs share an encoding.
    """
    h = hashlib.blake2b(digest_size=16)
    for item_id, rating, timestamp in interactions:
        raw = str(item_id).encode()
        h.update(struct.pack("<I", len(raw)))
        h.update(raw)
        h.update(struct.pack("<d", float(rating)))
        h.update(struct.pack("<?q", timestamp is not None, 0 if timestamp is None else int(timestamp)))
    h.update(b"\x00features")
    for name in sorted(user_features or {}):
        value = repr(user_features[name]).encode()
        key = name.encode()
        h.update(struct.pack("<II", len(key), len(value)))
        h.update(key)
        h.update(value)
    return h.digest()


class AdaptedUserCache:
    """Thread-safe LRU mapping :class:`CacheKey` → adapted user; ``max_entries=0`` disables it.

    Args:
        max_entries: most adapted users kept.
        on_lookup: ``on_lookup(hit)``, called after every :meth:`get` (metrics).
    """

    def __init__(self, max_entries: int = 10_000, on_lookup: Callable[[bool], None] | None = None) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = int(max_entries)
        self._on_lookup = on_lookup
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        """The cached value (now most recently used) or ``None``."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
            else:
                self._entries.move_to_end(key)
                self.hits += 1
        if self._on_lookup is not None:
            self._on_lookup(value is not None)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        """Insert or refresh ``key``, evicting the least recently used beyond the bound."""
        if self.max_entries == 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def drop_model(self, model_name: str, keep_version: int) -> int:
        """Evict entries of ``model_name`` other than ``keep_version`` (after a hot swap).

        Such entries could never be hit again; dropping them frees their weights now rather
        than when the LRU gets round to them. Returns how many were evicted.
        """
        with self._lock:
            stale = [
                k
                for k in self._entries
                if isinstance(k, CacheKey) and k.model_name == model_name and k.model_version != keep_version
            ]
            for k in stale:
                del self._entries[k]
            return len(stale)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
