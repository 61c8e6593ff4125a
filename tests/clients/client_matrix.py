"""The client matrix's shared expectations (importable by name from the client test modules)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness import ProxyUnderTest

SCHEMA = """
drop schema if exists clientm cascade;
create schema clientm;
create table clientm.customers (id int primary key, name text not null, email text not null);
insert into clientm.customers values (1, 'Ann', 'ann@example.com'), (2, 'Bob', 'bob@example.com');
create table clientm.salaries (id int, amount numeric);
create table clientm.payouts (id int);
insert into clientm.payouts values (1), (2);
grant usage on schema clientm to agent_reader, agent_writer;
grant select on all tables in schema clientm to agent_reader;
grant select, insert, update, delete on all tables in schema clientm to agent_writer;
"""
POLICY = """
rules:
  - name: no-salaries
    match: {tables: ["*salaries*"]}
    action: deny
    message: salaries are off limits for agents
  - name: dba-approves-destructive
    match: {classes: [destructive]}
    action: approve
    approvers: [dba]
default: allow
"""
RULES = """
tables:
  clientm.customers:
    applies_to: {groups: [agents]}
    columns:
      email: email
"""
MASKING_KEY_ENV = "PGPROXY_TEST_CLIENTS_MASKING_KEY"


@dataclass
class Matrix:
    """A proxy for the client matrix and what every client must see through it."""

    proxy: ProxyUnderTest
    token: str  # an agent's JWT: groups [agents], role agent_writer

    parameterised_name = "Ann"  # name of customer 1, asked for with a bound parameter
    masked_email = "****@example.com"  # customer 1's email as agents see it
    denied_sqlstate = "42501"
    denied_message = "salaries are off limits for agents"
    approval_sqlstate = "PXA01"

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def ca_file(self) -> Path:
        return self.proxy.tls.ca_file

    @property
    def database(self) -> str:
        return self.proxy.database.database

    def pending_approvals(self) -> list[str]:
        """Ids of the approval requests waiting in the proxy's store."""
        server = self.proxy.running.server
        assert server is not None and server.approval_store is not None
        return [r.id for r in self.proxy.running.call(server.approval_store.list("pending", 1000))]
