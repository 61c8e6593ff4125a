"""Statement: the text the server reads, parsed lazily and at most once, analyses memoized on it."""

from __future__ import annotations

from typing import Any

import pytest

import pgproxy.core.statement
from pgproxy.core.statement import SqlSyntaxError, Statement
from pgproxy.policy.classify import classify_statement


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    texts: list[str] = []
    real = pgproxy.core.statement.parse_sql

    def counting(sql: str) -> Any:
        texts.append(sql)
        return real(sql)

    monkeypatch.setattr(pgproxy.core.statement, "parse_sql", counting)
    return texts


def test_nothing_is_parsed_until_asked_and_then_once(parsed: list[str]) -> None:
    statement = Statement(0x51, "select 1 as unit_once_a")
    assert parsed == []
    first = statement.tree
    assert statement.tree is first
    assert parsed == ["select 1 as unit_once_a"]


def test_the_parse_is_of_the_servers_reading() -> None:
    statement = Statement(0x51, r"select 'a\'b' as unit_once_b", reading="select E'a\\'b' AS unit_once_b")
    assert statement.server_text() == statement.reading
    assert type(statement.tree[0].stmt).__name__ == "SelectStmt"


def test_a_syntax_error_is_raised_on_every_use_but_parsed_once(parsed: list[str]) -> None:
    statement = Statement(0x51, "selec 1 unit_once_c")
    for _ in range(2):
        with pytest.raises(SqlSyntaxError) as caught:
            _ = statement.tree
        assert caught.value.position == 1
    assert parsed == ["selec 1 unit_once_c"]


def test_analyses_are_memoized_on_the_statement() -> None:
    calls: list[Statement] = []

    def analysis(statement: Statement) -> int:
        calls.append(statement)
        return len(statement.tree)

    statement = Statement(0x51, "select 1; select 2")
    assert statement.derive(analysis) == 2 and statement.derive(analysis) == 2
    assert calls == [statement]


def test_a_consumer_that_changes_the_tree_takes_it_over(parsed: list[str]) -> None:
    statement = Statement(0x51, "select 1 as unit_once_d")
    classify_statement(statement)  # a reader first: the one parse
    taken = statement.take_tree()
    assert len(parsed) == 1
    assert statement.tree is not taken  # a later reader never sees the changed tree: it parses again
    assert len(parsed) == 2


def test_classification_reads_the_statements_parse(parsed: list[str]) -> None:
    statement = Statement(0x50, "delete from unit_once_e")
    assert "destructive" in classify_statement(statement).classes
    assert classify_statement(statement) is classify_statement(Statement(0x51, "delete from unit_once_e"))
    assert parsed == ["delete from unit_once_e"]


def test_a_kept_result_is_recalled_and_overwritten_by_a_later_one() -> None:
    def key(statement: Statement) -> int:
        raise AssertionError("kept, never derived")

    statement = Statement(0x51, "select 1")
    assert statement.recall(key) is None
    statement.remember(key, 1)
    statement.remember(key, 2)  # e.g. a plan made again once the catalog was read again
    assert statement.recall(key) == 2 and statement.derive(key) == 2
