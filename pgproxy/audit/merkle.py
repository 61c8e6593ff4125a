"""Merkle tree hashing, inclusion and consistency proofs as in RFC 9162 (Certificate Transparency v2).

leaf hash = SHA-256(0x00 || leaf bytes), node hash = SHA-256(0x01 || left || right); the tree over n
leaves splits at the largest power of two smaller than n. ``CompactTree`` appends leaves in O(1)
amortised and keeps only the roots of its perfect subtrees, so the signed log can compute the root at
any size while it writes. Proof functions work on a list of leaf hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH over leaf *hashes* (already ``leaf_hash``-ed)."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(root_of(leaves[:k]), root_of(leaves[k:]))


class CompactTree:
    """An append-only Merkle tree that remembers only its perfect subtrees' roots (the "frontier")."""

    __slots__ = ("_frontier", "size")

    def __init__(self) -> None:
        self.size = 0
        self._frontier: list[bytes] = []  # roots of perfect subtrees, largest first

    def append(self, leaf: bytes) -> None:
        """Add one leaf *hash*."""
        frontier = self._frontier
        n = self.size
        self.size = n + 1
        while n & 1:  # merge equal-height subtrees, like binary carry (node_hash, inline: once per append)
            leaf = _sha256(b"\x01" + frontier.pop() + leaf).digest()
            n >>= 1
        frontier.append(leaf)

    @property
    def frontier(self) -> list[bytes]:
        return list(self._frontier)

    @classmethod
    def restore(cls, size: int, frontier: Sequence[bytes]) -> CompactTree:
        """The tree of ``size`` leaves whose frontier is ``frontier`` (one root per set bit of ``size``)."""
        if size < 0 or len(frontier) != size.bit_count() or any(len(h) != 32 for h in frontier):
            raise ValueError(f"not the frontier of a tree of {size} leaves")
        tree = cls()
        tree.size, tree._frontier = size, list(frontier)
        return tree

    def root(self) -> bytes:
        frontier = self._frontier
        if not frontier:
            return EMPTY_ROOT
        result = frontier[-1]
        for h in reversed(frontier[:-1]):
            result = node_hash(h, result)
        return result


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(index, leaves) of RFC 9162 section 2.1.3.1."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} outside a tree of size {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(index, leaves[:k]), root_of(leaves[k:])]
    return [*inclusion_proof(index - k, leaves[k:]), root_of(leaves[:k])]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2: is ``leaf`` (a leaf hash) at ``index`` of the tree with ``root``?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def consistency_proof(old_size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(old_size, leaves) of RFC 9162 section 2.1.4.1."""
    n = len(leaves)
    if not 0 < old_size <= n:
        raise ValueError(f"no consistency proof from size {old_size} to {n}")
    return _subproof(old_size, leaves, True)


def _subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root_of(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete), root_of(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), root_of(leaves[:k])]


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 section 2.1.4.2: is the tree (new_size, new_root) an extension of (old_size, old_root)?"""
    if old_size <= 0 or old_size > new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is itself a node of the new tree
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


class TreeView:
    """Proofs over a fixed list of leaf hashes, memoising subtree roots (many proofs, one tree)."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.leaves = leaves
        self._roots: dict[tuple[int, int], bytes] = {}

    def root(self, lo: int = 0, hi: int | None = None) -> bytes:
        hi = len(self.leaves) if hi is None else hi
        n = hi - lo
        if n == 0:
            return EMPTY_ROOT
        if n == 1:
            return self.leaves[lo]
        cached = self._roots.get((lo, hi))
        if cached is None:
            k = _split(n)
            cached = node_hash(self.root(lo, lo + k), self.root(lo + k, hi))
            self._roots[(lo, hi)] = cached
        return cached

    def inclusion(self, index: int, size: int) -> list[bytes]:
        """PATH(index, leaves[:size])."""
        if not 0 <= index < size <= len(self.leaves):
            raise ValueError(f"leaf index {index} outside a tree of size {size}")
        path: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self.root(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.root(lo, lo + k))
                lo = lo + k
        path.reverse()
        return path
