"""Masking for `pgproxy audit replay`: rewrite a recorded session's statements as the proxy did.

A masked identity's results were recorded masked, so replaying its statements raw against a sandbox
can never reproduce their digests. With the proxy's config, the replay applies the same rules (for the
identity and role recorded at session start) and the same key to the sandbox's own catalog.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..config import ConfigError, ProxyConfig
from .catalog import read_catalog, resolve
from .masks import MaskKey
from .rewrite import Rewritten, rewrite
from .rules import MaskingRules, load_rules


@dataclass(frozen=True)
class RecordedIdentity:
    subject: str
    groups: Sequence[str]
    agent_id: str | None

    @classmethod
    def from_event(cls, fields: dict[str, Any]) -> RecordedIdentity:
        return cls(str(fields.get("subject") or ""), tuple(fields.get("groups") or ()), fields.get("agent_id"))


class ReplayMasking:
    def __init__(self, rules: MaskingRules, key: MaskKey | None) -> None:
        self.rules = rules
        self.key = key

    @classmethod
    def from_config(cls, config: ProxyConfig) -> ReplayMasking:
        if config.masking is None:
            raise ConfigError("the config has no masking section")
        secret = config.masking.key()
        return cls(load_rules(config.masking.rules_dir), MaskKey(secret) if secret is not None else None)

    async def for_session(self, dsn: str, identity: RecordedIdentity,
                          role: str) -> Callable[[str], Rewritten] | None:
        """The rewrite the proxy applied to this identity's statements; None when no rule applied."""
        rules = tuple(r for r in self.rules.rules if r.applies(identity, role))
        if not rules:
            return None
        conn = await asyncpg.connect(dsn)
        try:
            catalog = await read_catalog(conn, {(r.schema, r.table) for r in rules})
        finally:
            await conn.close()
        return functools.partial(_rewrite, resolve(catalog, rules, self.key))


def _rewrite(schema: Any, sql: str) -> Rewritten:
    return rewrite(sql, schema)
