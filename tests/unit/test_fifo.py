"""FifoDict: the bounded cache of the per-statement path."""

from __future__ import annotations

from pgproxy.fifo import FifoDict


def test_keep_forgets_the_oldest_entry_when_full() -> None:
    cache: FifoDict[str, int] = FifoDict(2)
    assert cache.keep("a", 1) == 1
    cache.keep("b", 2)
    assert cache.get("a") == 1  # a read does not reorder
    cache.keep("c", 3)
    assert dict(cache) == {"b": 2, "c": 3}
    cache.keep("b", 4)  # replacing a present key forgets nothing
    assert dict(cache) == {"b": 4, "c": 3}
