"""A bounded cache for the per-statement path: an ordered dict that forgets its oldest entry when full.

cachetools' caches cost two Python-level calls per look-up (and an LRU one reorders on every hit); a
statement passes several caches, most of them keyed by text that new literals make unique, where
recency order buys little. Reads of a ``FifoDict`` are plain (C) dict reads; ``keep`` stores. An
``OrderedDict`` drops its oldest entry in constant time (a ``dict`` would scan the holes left by earlier
deletions).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class FifoDict(OrderedDict[K, V]):
    """A dict of at most ``maxsize`` entries: ``keep`` forgets the oldest one to make room (first in, first out)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def keep(self, key: K, value: V) -> V:
        """Store ``value`` under ``key`` and return it."""
        if len(self) >= self.maxsize and key not in self:
            self.popitem(last=False)
        self[key] = value
        return value
