"""SQLAlchemy 2 (psycopg dialect) through the proxy: engine with a JWT, inspection, bound parameters,
a masked read, a denied statement and one that needs an approval (SQLAlchemy always opens a transaction)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from client_matrix import Matrix
from sqlalchemy.engine import Engine

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def engine(matrix: Matrix) -> Iterator[Engine]:
    url = sa.URL.create("postgresql+psycopg", username="agent_writer", password=matrix.token, host="127.0.0.1",
                        port=matrix.port, database=matrix.database,
                        query={"sslmode": "verify-full", "sslrootcert": str(matrix.ca_file)})
    engine = sa.create_engine(url, pool_pre_ping=True)
    yield engine
    engine.dispose()


def test_inspection(engine: Engine) -> None:
    inspector = sa.inspect(engine)
    assert "clientm" in inspector.get_schema_names()
    assert set(inspector.get_table_names(schema="clientm")) == {"customers", "salaries", "payouts"}
    columns = {c["name"]: str(c["type"]) for c in inspector.get_columns("customers", schema="clientm")}
    assert columns == {"id": "INTEGER", "name": "TEXT", "email": "TEXT"}
    assert inspector.get_pk_constraint("customers", schema="clientm")["constrained_columns"] == ["id"]


def test_parameterised_query_and_masked_read(engine: Engine, matrix: Matrix) -> None:
    customers = sa.Table("customers", sa.MetaData(), autoload_with=engine, schema="clientm")
    with engine.connect() as conn:
        assert conn.execute(sa.text("select name from clientm.customers where id = :id"), {"id": 1}).scalar_one() \
            == matrix.parameterised_name
        row = conn.execute(sa.select(customers.c.email).where(customers.c.id == 1)).one()
        assert row.email == matrix.masked_email


def test_denied_and_approval_needing_statements(engine: Engine, matrix: Matrix) -> None:
    with engine.connect() as conn:
        with pytest.raises(sa.exc.ProgrammingError) as denied:
            conn.execute(sa.text("select * from clientm.salaries"))
        assert denied.value.orig.sqlstate == matrix.denied_sqlstate  # type: ignore[union-attr]
        assert matrix.denied_message in str(denied.value)
        conn.rollback()
        with pytest.raises(sa.exc.DBAPIError) as approval:
            conn.execute(sa.text("delete from clientm.payouts"))
        assert approval.value.orig.sqlstate == matrix.approval_sqlstate  # type: ignore[union-attr]
        message = str(approval.value.orig)
        approval_id = message[message.index("apr_"):].split()[0]
        assert approval_id in matrix.pending_approvals()
        assert "roll back this transaction" in message  # SQLAlchemy is always in a transaction
        conn.rollback()
        assert conn.execute(sa.text("select count(*) from clientm.payouts")).scalar_one() == 2
