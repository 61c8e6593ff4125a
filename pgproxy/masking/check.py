"""Masking rules against reality: they load, the key is there, every rule fits the live schema, and no
upstream role that masked identities may use can step around masking.

`pgproxy check` reports the problems; `serve` refuses to start (and a reload is refused) on a rule that
names a relation or column the live schema lacks, unless ``masking.allow_schema_mismatch`` is set:
a misspelt column would otherwise leave the real one unmasked.
"""

from __future__ import annotations

import asyncpg

from ..config import ConfigError, ProxyConfig
from ..upstream_login import upstream_dsn
from .catalog import read_catalog
from .roles import refusal_message, unmaskable
from .rules import Audience, MaskingRules, load_rules


def check_rules(config: ProxyConfig) -> tuple[MaskingRules | None, list[str]]:
    """The loaded rules (None if they do not load) and the problems found without a database."""
    assert config.masking is not None
    try:
        rules = load_rules(config.masking.rules_dir)
    except ConfigError as exc:
        return None, [str(exc)]
    problems: list[str] = []
    try:
        key = config.masking.key()
    except ConfigError as exc:
        return rules, [str(exc)]
    if rules.needs_key and key is None:
        problems.append("masking: a rule uses keyed_hash: set masking.key_env or masking.key_file")
    return rules, problems


async def check_live(config: ProxyConfig, rules: MaskingRules, role: str, database: str, *,
                     roles: bool = True) -> list[str]:
    """Every masked relation and column exists upstream, and each mask can produce the column's type;
    with ``roles``, also the upstream roles masked identities may use (serve checks those at each login)."""
    try:
        conn = await asyncpg.connect(upstream_dsn(config.upstream, role, database),
                                     timeout=config.upstream.connect_timeout_seconds)
    except (OSError, asyncpg.PostgresError, TimeoutError, ConfigError) as exc:
        return [f"masking: cannot read the live schema as {role!r} in database {database!r}: {exc}"]
    try:
        catalog = await read_catalog(conn, ())
        problems = await _unmaskable_roles(conn, config, rules, role) if roles else []
    finally:
        await conn.close()
    for rule in rules.rules:
        relation = catalog.find(rule.schema, rule.table)
        if relation is None:
            problems.append(f"{rule.where}: relation {rule.qualified_table} does not exist in {database!r}")
            continue
        column = relation.column(rule.column)
        if column is None:
            problems.append(f"{rule.where}: column {rule.column!r} does not exist in {rule.qualified_table}")
            continue
        reason = rule.mask.check_type(column.type_name, column.category)
        if reason is not None:
            problems.append(f"{rule.where}: {reason}")
    return problems


def schema_target(config: ProxyConfig) -> tuple[str | None, str]:
    """The role and database whose live schema the rules are checked against.

    The role: ``masking.schema_role``, else the first credential with a role name, else
    ``identity.default_db_role`` (None when there is none). The database: ``masking.schema_database``,
    else ``upstream.database``, else ``postgres``.
    """
    assert config.masking is not None
    role = (config.masking.schema_role
            or next((c.role for c in config.upstream.credentials if c.role != "*"), None)
            or config.identity.default_db_role)
    return role, config.masking.schema_database or config.upstream.database or "postgres"


async def check_schema(config: ProxyConfig, rules: MaskingRules) -> list[str]:
    """What `serve` checks at start: the rules against the live schema of ``schema_target``."""
    role, database = schema_target(config)
    if role is None:
        return ["masking.schema_role: required to read the live schema (the credentials only have '*' and "
                "there is no identity.default_db_role)"]
    return await check_live(config, rules, role, database, roles=False)


async def _unmaskable_roles(conn: asyncpg.Connection, config: ProxyConfig, rules: MaskingRules,
                            role: str) -> list[str]:
    """The credential roles (and ``role``) some rule may mask that the proxy would refuse at login."""
    problems = []
    for name in dict.fromkeys([role, *(c.role for c in config.upstream.credentials if c.role != "*")]):
        if not any(_may_include(r.applies_to, name) and not (r.exempt.roles and name in r.exempt.roles)
                   for r in rules.rules):
            continue
        try:
            reasons = await unmaskable(conn, name)
        except asyncpg.PostgresError as exc:
            problems.append(f"masking: cannot check the capabilities of role {name!r}: {exc}")
            continue
        if reasons:
            problems.append(f"masking: {refusal_message(name, reasons)} (they are refused at login)")
    return problems


def _may_include(audience: Audience, role: str) -> bool:
    """Whether some identity logged in as ``role`` may be in ``audience``."""
    keys = (audience.subjects, audience.groups, audience.roles, audience.agent_ids)
    return all(k is None for k in keys) or bool(audience.subjects or audience.groups or audience.agent_ids) or (
        audience.roles is not None and role in audience.roles)
