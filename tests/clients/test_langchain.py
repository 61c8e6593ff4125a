"""LangChain's SQLDatabase and SQL toolkit through the proxy, as an agent's tools call it: list tables,
read a table's schema with sample rows (masked), run a parameterised query, and get clear errors for a
denied statement and one that needs an approval (the approval id, and what to do, in the tool's text)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from client_matrix import Matrix
from langchain_community.agent_toolkits import SQLDatabaseToolkit
from langchain_community.utilities import SQLDatabase
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.tools import BaseTool

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def sql_database(matrix: Matrix) -> Iterator[SQLDatabase]:
    url = sa.URL.create("postgresql+psycopg", username="agent_writer", password=matrix.token, host="127.0.0.1",
                        port=matrix.port, database=matrix.database,
                        query={"sslmode": "verify-full", "sslrootcert": str(matrix.ca_file),
                               "options": "-csearch_path=clientm"})
    # The search path comes with the startup packet: SQLDatabase(schema=...) sends `SET search_path TO $1`,
    # which psycopg 3's server-side parameters cannot express (with or without the proxy).
    db = SQLDatabase.from_uri(url.render_as_string(hide_password=False), sample_rows_in_table_info=2)
    yield db
    db._engine.dispose()


@pytest.fixture(scope="module")
def tools(sql_database: SQLDatabase) -> dict[str, BaseTool]:
    # The LLM only serves the query-checker tool, which these tests do not call: the database calls are real.
    toolkit = SQLDatabaseToolkit(db=sql_database, llm=FakeListLLM(responses=["unused"]))
    return {tool.name: tool for tool in toolkit.get_tools()}


def test_list_and_schema_tools_show_masked_samples(tools: dict[str, BaseTool], matrix: Matrix) -> None:
    assert set(tools["sql_db_list_tables"].invoke("").split(", ")) == {"customers", "payouts", "salaries"}
    info = tools["sql_db_schema"].invoke("customers")
    assert "CREATE TABLE customers" in info and "email TEXT" in info
    assert matrix.masked_email in info and "ann@example.com" not in info


def test_parameterised_query_and_masked_read(sql_database: SQLDatabase, tools: dict[str, BaseTool],
                                             matrix: Matrix) -> None:
    assert sql_database.run("select name from clientm.customers where id = :id", parameters={"id": 1}) \
        == f"[('{matrix.parameterised_name}',)]"
    assert tools["sql_db_query"].invoke("select email from clientm.customers where id = 1") \
        == f"[('{matrix.masked_email}',)]"


def test_denied_and_approval_needing_statements_are_clear_tool_errors(tools: dict[str, BaseTool],
                                                                      matrix: Matrix) -> None:
    denied = tools["sql_db_query"].invoke("select * from clientm.salaries")
    assert denied.startswith("Error: ") and matrix.denied_message in denied
    approval = tools["sql_db_query"].invoke("delete from clientm.payouts")
    assert approval.startswith("Error: ") and "approval apr_" in approval
    approval_id = approval[approval.index("apr_"):].split()[0]
    assert approval_id in matrix.pending_approvals()
    assert f"pgproxy approvals approve {approval_id}" in approval and "run it again" in approval
    # The toolkit's connection is usable afterwards (SQLAlchemy rolled the failed transaction back).
    assert tools["sql_db_query"].invoke("select count(*) from clientm.payouts") == "[(2,)]"
