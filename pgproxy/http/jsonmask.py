"""JSON field paths (``$.customer.email``, ``items[*].ssn``) and masking a parsed document by them.

Pure functions over already-parsed JSON values. Masking copies only the containers on the way to a
masked field and never changes its input, so the same document can be masked differently for the
audit log and for the caller.

Path syntax: an optional ``$``, then segments: ``.name`` (or a bare leading ``name``), ``['name']``
for keys with dots or spaces, ``[n]`` for a list index, ``[*]`` or ``.*`` for every element or key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MASK = "[masked]"
WILDCARD = None  # a segment matching every key of an object / every item of a list

Segment = str | int | None

_TOKEN = re.compile(r"""\.?([A-Za-z_$@][\w$@-]*|\*)|\[(\*|-?\d+|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\]""")


@dataclass(frozen=True)
class JsonPath:
    text: str
    segments: tuple[Segment, ...]

    def __str__(self) -> str:
        return self.text


def parse_path(text: str) -> JsonPath:
    """Parse ``text``; raises ValueError saying what is wrong."""
    rest = text.strip()
    if rest.startswith("$"):
        rest = rest[1:]
    segments: list[Segment] = []
    pos = 0
    while pos < len(rest):
        m = _TOKEN.match(rest, pos)
        if m is None:
            raise ValueError(f"invalid JSON path {text!r} at {rest[pos:]!r} (expected .name, [n], [*] or ['name'])")
        name, bracket = m.group(1), m.group(2)
        if name is not None:
            segments.append(WILDCARD if name == "*" else name)
        elif bracket == "*":
            segments.append(WILDCARD)
        elif bracket[0] in "'\"":
            segments.append(re.sub(r"\\(.)", r"\1", bracket[1:-1]))
        else:
            segments.append(int(bracket))
        pos = m.end()
    if not segments:
        raise ValueError(f"invalid JSON path {text!r}: it names no field (masking the whole body is not a path)")
    return JsonPath(text.strip(), tuple(segments))


def mask_json(document: Any, paths: Iterable[JsonPath], replacement: Any = MASK) -> tuple[Any, list[str]]:
    """``document`` with every field named by ``paths`` replaced; also the paths that matched something."""
    hits: list[str] = []
    for path in paths:
        document, changed = _apply(document, path.segments, replacement)
        if changed:
            hits.append(path.text)
    return document, hits


def _apply(node: Any, segments: tuple[Segment, ...], replacement: Any) -> tuple[Any, bool]:
    if not segments:
        return replacement, True
    head, tail = segments[0], segments[1:]
    if isinstance(node, dict):
        keys = list(node) if head is WILDCARD else [head] if isinstance(head, str) and head in node else []
    elif isinstance(node, list):
        if head is WILDCARD:
            keys = list(range(len(node)))
        elif isinstance(head, int) and -len(node) <= head < len(node):
            keys = [head % len(node)]
        else:
            keys = []
    else:
        keys = []
    changed_any = False
    copy: Any = None
    for key in keys:
        value, changed = _apply(node[key], tail, replacement)
        if changed:
            if copy is None:
                copy = dict(node) if isinstance(node, dict) else list(node)
            copy[key] = value
            changed_any = True
    return (copy if changed_any else node), changed_any
