"""The configuration reference tables of docs/configuration.md, generated from the config schema.

Each section of the schema (`pgproxy.config.ProxyConfig` and every mapping below it) has a table in
docs/configuration.md between ``<!-- config-reference: PATH -->`` and ``<!-- /config-reference -->``
markers (http.md and grpc.md hold some too); the prose around the markers is written by hand and kept.
Run ``python -m pgproxy.configdoc`` to rewrite the tables; tests/unit/test_configdoc.py fails when a
committed page differs from what it writes.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .config import ProxyConfig, complete_schema
from .http.jsonmask import JsonPath
from .schema import Between, FilePath, Matches, NonEmpty

DOCS = Path(__file__).resolve().parent.parent / "docs"
MAIN = "configuration.md"  # the complete reference: a table for every section
PAGES = (MAIN, "http.md", "grpc.md")
REGENERATE = "python -m pgproxy.configdoc"
# The root's marker names no path: <!-- config-reference -->
_BLOCK = re.compile(r"(<!-- config-reference(?:: (?P<path>\S+))? -->\n)(?P<body>.*?)(<!-- /config-reference -->)", re.S)
_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path", JsonPath: "JSON path"}


class DocError(Exception):
    """The document and the schema do not fit together (a section without a table, or the reverse)."""


def sections() -> dict[str, type[BaseModel]]:
    """Every section of the schema by its dotted path (``""`` is the top level), each model once."""
    complete_schema()
    found: dict[str, type[BaseModel]] = {}

    def walk(path: str, model: type[BaseModel]) -> None:
        if model in found.values():
            return
        found[path] = model
        for name, field in model.model_fields.items():
            for nested in _models(field.annotation):
                walk(f"{path}.{field.alias or name}" if path else field.alias or name, nested)

    walk("", ProxyConfig)
    return found


def _models(tp: Any) -> Iterator[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield tp
    for arg in get_args(tp):
        yield from _models(arg)


def table(model: type[BaseModel], paths: dict[type[BaseModel], str], link: Callable[[str], str]) -> str:
    """The Markdown table of ``model``'s keys: key, type, default, description."""
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        kind, notes = _type(field.annotation, paths, link, field.metadata)
        text = " ".join(" ".join([field.description or "", *notes]).split()).replace("|", "\\|")
        rows.append(f"| `{field.alias or name}` | {kind} | {_default(field)} | {text} |")
    return "\n".join(rows) + "\n"


def _type(tp: Any, paths: dict[type[BaseModel], str], link: Callable[[str], str],
          meta: Sequence[Any] = ()) -> tuple[str, list[str]]:
    """How a field's type reads in the table, and the rules (from ``meta``) it adds to the description."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _type(args[0], paths, link, [*args[1:], *meta])
    notes: list[str] = []
    if origin in (Union, types.UnionType):
        parts = [_type(a, paths, link) for a in args if a is not type(None)]
        text, notes = " or ".join(p[0] for p in parts), [n for p in parts for n in p[1]]
    elif origin is Literal:
        text = "one of " + ", ".join(f"`{a}`" for a in args)
    elif origin is tuple:
        text, notes = _type(args[0], paths, link)
        text = "list of " + (text if text.startswith(("one of", "[")) else _plural(text))
    elif origin is dict:
        text = "mapping"
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        text = f"[`{paths[tp]}`]({link(paths[tp])})"
    else:
        text = _NAMES[tp]
    for m in meta:
        if isinstance(m, Between):
            text += f" ({_bound(m)})"
        elif isinstance(m, FilePath) and m.must_exist:
            notes.append("The file must exist.")
        elif isinstance(m, Matches):
            rule = m.rule or m.says
            notes.append(f"{rule[0].upper()}{rule[1:]}.")
        elif isinstance(m, NonEmpty):
            notes.append("At least one entry.")
    return text, notes


def _plural(text: str) -> str:
    word, _, rest = text.partition(" (")
    return f"{word}s" + (f" ({rest}" if rest else "")


def _bound(between: Between) -> str:
    if between.high is None:
        return f"≥ {_number(between.low)}"
    return f"{_number(between.low)}\N{EN DASH}{_number(between.high)}"


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _default(field: FieldInfo) -> str:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "doc_default" in extra:
        return str(extra["doc_default"])
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, BaseModel):
        return "all defaults"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`[{', '.join(str(v) for v in value)}]`"
    if isinstance(value, float):
        return f"`{_number(value)}`"
    return f"`{value}`"


def _heading_slug(text: str, position: int) -> str:
    """GitHub's anchor of the last heading before ``position``."""
    heading = text[:position].rsplit("\n#", 1)[-1].split("\n", 1)[0].lstrip("#").strip()
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


def render(docs: dict[str, str]) -> dict[str, str]:
    """``docs`` (file name: text) with every reference table rewritten from the schema.

    MAIN holds a table for every section (the complete reference); other pages may hold tables of the
    sections they explain. A link to a section goes to its table on the same page, else in MAIN.
    """
    found = sections()
    paths = {model: path for path, model in found.items()}
    anchors: dict[tuple[str, str], str] = {}
    for name, text in docs.items():
        for m in _BLOCK.finditer(text):
            if (m["path"] or "") not in found:
                raise DocError(f"{name}: config-reference {m['path']!r} names no section of the config schema")
            anchors[name, m["path"] or ""] = _heading_slug(text, m.start())
    missing = [repr(p or "(top level)") for p in found if (MAIN, p) not in anchors]
    if missing:
        raise DocError(f"{MAIN}: no config-reference table for {', '.join(missing)}")

    def rendered(name: str, text: str) -> str:
        def link(path: str) -> str:
            return f"#{anchors[name, path]}" if (name, path) in anchors else f"{MAIN}#{anchors[MAIN, path]}"

        return _BLOCK.sub(lambda m: m[1] + table(found[m["path"] or ""], paths, link) + m[4], text)

    return {name: rendered(name, text) for name, text in docs.items()}


@click.command()
@click.option("--check", is_flag=True, help="Exit 1 if a page differs from what the schema generates.")
def main(check: bool) -> None:
    """Rewrite the configuration reference tables in docs/ from the config schema."""
    docs = {name: (DOCS / name).read_text() for name in PAGES}
    try:
        new = render(docs)
    except DocError as exc:
        raise click.ClickException(str(exc)) from None
    stale = [name for name in PAGES if new[name] != docs[name]]
    if check:
        if stale:
            click.echo(f"out of date with the config schema: {', '.join(stale)}; run `{REGENERATE}`", err=True)
            sys.exit(1)
        return
    for name in stale:
        (DOCS / name).write_text(new[name])
        click.echo(f"docs/{name}: updated")


if __name__ == "__main__":
    main()
