"""Database roles that can step around any rewrite, and so cannot be masked.

A superuser, a role with BYPASSRLS, CREATEROLE or REPLICATION, a member of pg_read_server_files /
pg_write_server_files / pg_execute_server_program, a role that can write a system catalog, execute the
server-file functions, use a foreign-data wrapper, a foreign server or dblink reads raw data past any
statement rewrite (``UPDATE pg_class SET relname = ...``, ``lo_import`` of a table's file, ``COPY ... FROM
PROGRAM``, a loopback postgres_fdw). Masked identities are refused such a role at login; ``pgproxy check``
flags it. Membership counts the way the server grants it: a role counts with every role it can ``SET ROLE``
to (``pg_has_role(..., 'MEMBER')``), inherited or not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

# (kind, object, through): what makes the role $1 unmaskable; ``through`` is the role that has it.
_CAPABILITIES = """
WITH reach AS (
  SELECT r.oid, r.rolname::text AS rolname, r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolreplication
  FROM pg_catalog.pg_roles r WHERE pg_catalog.pg_has_role($1::name, r.oid, 'MEMBER'))
SELECT 'superuser', '', rolname FROM reach WHERE rolsuper
UNION ALL SELECT 'bypassrls', '', rolname FROM reach WHERE rolbypassrls
UNION ALL SELECT 'createrole', '', rolname FROM reach WHERE rolcreaterole
UNION ALL SELECT 'replication', '', rolname FROM reach WHERE rolreplication
UNION ALL SELECT 'member', g.rolname::text, '' FROM pg_catalog.pg_roles g
  WHERE g.rolname IN ('pg_read_server_files', 'pg_write_server_files', 'pg_execute_server_program')
    AND pg_catalog.pg_has_role($1::name, g.oid, 'MEMBER')
UNION ALL SELECT DISTINCT ON (c.relname) 'catalog', c.relname::text, reach.rolname
  FROM pg_catalog.pg_class c, reach
  WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relkind = 'r'
    AND (pg_catalog.has_table_privilege(reach.oid, c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE')
         OR pg_catalog.has_any_column_privilege(reach.oid, c.oid, 'INSERT, UPDATE'))
UNION ALL SELECT DISTINCT ON (p.proname) 'function', p.proname::text, reach.rolname
  FROM pg_catalog.pg_proc p, reach
  WHERE (p.pronamespace = 'pg_catalog'::regnamespace AND p.proname IN ('lo_import', 'lo_export', 'pg_read_file',
           'pg_read_binary_file', 'pg_ls_dir', 'pg_stat_file')
         OR p.proname IN ('dblink_connect', 'dblink_connect_u', 'dblink', 'dblink_exec'))
    AND pg_catalog.has_function_privilege(reach.oid, p.oid, 'EXECUTE')
UNION ALL SELECT DISTINCT ON (w.fdwname) 'fdw', w.fdwname::text, reach.rolname
  FROM pg_catalog.pg_foreign_data_wrapper w, reach
  WHERE pg_catalog.has_foreign_data_wrapper_privilege(reach.oid, w.oid, 'USAGE')
UNION ALL SELECT DISTINCT ON (s.srvname) 'server', s.srvname::text, reach.rolname
  FROM pg_catalog.pg_foreign_server s, reach
  WHERE pg_catalog.has_server_privilege(reach.oid, s.oid, 'USAGE')
UNION ALL SELECT DISTINCT ON (m.srvname) 'mapping', m.srvname::text, m.usename::text
  FROM pg_catalog.pg_user_mappings m
  WHERE m.umuser = 0 OR m.umuser IN (SELECT oid FROM reach)
"""

_WHY = {
    "superuser": "is a superuser",
    "bypassrls": "has BYPASSRLS",
    "createrole": "has CREATEROLE (it can grant itself pg_execute_server_program)",
    "replication": "has REPLICATION (it can read raw changes from the WAL)",
    "member": "is a member of {} (it can read or write server files or run programs: lo_import of a table's "
              "file, COPY ... FROM PROGRAM)",
    "catalog": "can write the system catalogs {} (e.g. UPDATE pg_class SET relname = ...)",  # PG15: superusers
    "function": "can execute {} (server files, or a connection back to the database)",
    "fdw": "can use the foreign-data wrapper {} (a loopback foreign table reads raw rows)",
    "server": "can use the foreign server {} (a loopback foreign table reads raw rows)",
    "mapping": "has a user mapping for the foreign server {} (a loopback foreign table reads raw rows)",
}


async def unmaskable(conn: asyncpg.Connection, role: str) -> tuple[str, ...]:
    """Why ``role`` can step around masking, one reason per capability; empty when it cannot."""
    found: dict[tuple[str, str], list[str]] = {}
    for kind, obj, through in await conn.fetch(_CAPABILITIES, role):
        found.setdefault((kind, "" if through in (role, "") else through), []).append(obj)
    if any(kind == "superuser" for kind, _ in found):  # a superuser can do all the rest: say only that
        found = {k: v for k, v in found.items() if k[0] == "superuser"}
    reasons = []
    for (kind, through), objects in found.items():
        names = ", ".join(objects[:3]) + (f" and {len(objects) - 3} more" if len(objects) > 3 else "")
        why = _WHY[kind].format(names)
        if through and kind == "mapping":
            why += f", for {'PUBLIC' if through == 'public' else through}"
        elif through:
            why = (why.replace("is a", "can SET ROLE to a", 1) if kind == "superuser" else why) + \
                f" through role {through}"
        reasons.append(why)
    return tuple(reasons)


def refusal_message(role: str, reasons: tuple[str, ...]) -> str:
    return (f'database role "{role}" can step around masking, so masked identities may not use it: it '
            + "; it ".join(reasons))


class RoleCheck:
    """``unmaskable`` per (database, role), re-read after ``ttl_seconds``; concurrent logins share one read."""

    def __init__(self, ttl_seconds: float) -> None:
        self.ttl_seconds = ttl_seconds
        self._known: dict[tuple[str, str], tuple[tuple[str, ...], float]] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[tuple[str, ...]]] = {}

    async def reasons(self, database: str, role: str, connect: Callable[[], Awaitable[Any]]) -> tuple[str, ...]:
        key = (database, role)
        known = self._known.get(key)
        if known is not None and time.monotonic() - known[1] <= self.ttl_seconds:
            return known[0]
        loading = self._loading.get(key)
        if loading is None:
            loading = self._loading[key] = asyncio.ensure_future(self._load(key, connect))
        return await asyncio.shield(loading)

    async def _load(self, key: tuple[str, str], connect: Callable[[], Awaitable[Any]]) -> tuple[str, ...]:
        try:
            conn = await connect()
            try:
                reasons = await unmaskable(conn, key[1])
            finally:
                await conn.close()
            self._known[key] = (reasons, time.monotonic())
            return reasons
        finally:
            self._loading.pop(key, None)
