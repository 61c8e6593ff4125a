"""The configuration reference in docs/ is generated from the config schema and must not drift from it."""

from __future__ import annotations

import pytest

from pgproxy.configdoc import DOCS, MAIN, PAGES, REGENERATE, DocError, render, sections


def test_committed_reference_matches_the_schema() -> None:
    docs = {name: (DOCS / name).read_text() for name in PAGES}
    stale = [name for name, text in render(docs).items() if text != docs[name]]
    assert not stale, f"docs/{', docs/'.join(stale)} differ from the config schema: run `{REGENERATE}`"


def test_every_section_and_key_is_in_the_reference() -> None:
    text = (DOCS / MAIN).read_text()
    for path, model in sections().items():
        marker = f"<!-- config-reference: {path} -->" if path else "<!-- config-reference -->"
        table = text.split(marker, 1)[1].split("<!-- /config-reference -->", 1)[0]
        for name, field in model.model_fields.items():
            assert f"| `{field.alias or name}` |" in table, (path, name)


def test_a_section_without_a_table_fails() -> None:
    docs = {name: (DOCS / name).read_text() for name in PAGES}
    docs[MAIN] = docs[MAIN].replace("<!-- config-reference: limits -->", "<!-- limits -->")
    with pytest.raises(DocError, match="no config-reference table for 'limits'"):
        render(docs)


def test_a_table_of_no_section_fails() -> None:
    docs = {name: (DOCS / name).read_text() for name in PAGES}
    docs["http.md"] += "\n## Old\n\n<!-- config-reference: http.timeouts -->\n<!-- /config-reference -->\n"
    with pytest.raises(DocError, match=r"'http\.timeouts' names no section"):
        render(docs)


def test_a_changed_default_changes_the_table() -> None:
    from pgproxy.config import LimitsConfig

    docs = {name: (DOCS / name).read_text() for name in PAGES}
    field = LimitsConfig.model_fields["max_connections"]
    original = field.default
    field.default = 7
    try:
        rendered = render(docs)[MAIN]
    finally:
        field.default = original
    assert "| `max_connections` | integer (≥ 1) | `7` |" in rendered
    assert rendered != docs[MAIN]
