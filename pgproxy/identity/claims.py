"""The caller identity built from a verified token's claims, and the rules for reading those claims.

``identity_from_claims`` turns already-verified JWT claims into an immutable :class:`Identity`:
it checks each claim's shape (rejecting junk with a :class:`TokenError` that names the claim) and
validates database role names. It must never be given, store or log the raw token: an Identity
carries only the verified claims and a ``token_id`` (the ``jti``, or a short hash of the token).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pgproxy.config import ClaimNames

# PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes; we refuse longer names instead.
MAX_ROLE_NAME_BYTES = 63
_GROUP_SEPARATORS = re.compile(r"[\s,]+")


class TokenError(Exception):
    """A token was refused. ``reason`` is short and safe to show to the client; it never contains the token.

    Also importable as ``pgproxy.identity.verifier.TokenError`` (it lives here so that this module,
    which the verifier imports, can raise it without an import cycle).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """Who is calling, as asserted by a verified token."""

    subject: str
    groups: tuple[str, ...]
    # Database roles the token allows; db_roles[0] is the default.
    db_roles: tuple[str, ...]
    agent_id: str | None
    session_id: str | None
    tool_call_id: str | None
    # The jti claim, else "sha256:" + the first 16 hex chars of SHA-256(raw token).
    token_id: str
    issuer: str
    # Epoch seconds (the exp claim).
    expires_at: float
    # The verified claims as a read-only copy (nested objects frozen too); never the raw token.
    claims: Mapping[str, Any] = field(hash=False, repr=False)

    def role_for(self, requested_user: str) -> str | None:
        """The database role to use for a startup ``user``, or None when the token doesn't allow it.

        A role listed in ``db_roles`` is used as asked; the token's subject or an empty user name
        selects the default role (``db_roles[0]``); anything else is refused.
        """
        if requested_user in self.db_roles:
            return requested_user
        if requested_user == "" or requested_user == self.subject:
            return self.db_roles[0]
        return None

    def audit_fields(self) -> dict[str, Any]:
        """JSON-ready fields that are safe to log (no raw token, no full claim set)."""
        return {
            "subject": self.subject,
            "groups": list(self.groups),
            "db_roles": list(self.db_roles),
            "agent_id": self.agent_id,
            "session_id": self.session_id,
            "tool_call_id": self.tool_call_id,
            "token_id": self.token_id,
            "issuer": self.issuer,
            "expires_at": self.expires_at,
        }


def _freeze(value: Any) -> Any:
    """A deep, read-only copy of JSON-like data: mappings become MappingProxyType, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _invalid(claim: str) -> TokenError:
    return TokenError(f"invalid claim: {claim}")


def _optional_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(name)
    return value


def _dedupe(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _groups(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return _dedupe([g for g in _GROUP_SEPARATORS.split(value) if g])
    if isinstance(value, list):
        if not all(isinstance(g, str) and g for g in value):
            raise _invalid(name)
        return _dedupe(value)
    raise _invalid(name)


def valid_role_name(role: str) -> bool:
    """A usable PostgreSQL role name: non-empty, at most 63 UTF-8 bytes, no NUL or other control chars.

    PostgreSQL accepts any non-NUL character in a (quoted) identifier; control characters are refused
    as well because they have no business in a role name and would only help log injection.
    """
    if not role or len(role.encode("utf-8", "surrogatepass")) > MAX_ROLE_NAME_BYTES:
        return False
    return all(ord(c) >= 0x20 and ord(c) != 0x7F and not 0xD800 <= ord(c) <= 0xDFFF for c in role)


def _db_roles(value: Any, name: str, default: str | None) -> tuple[str, ...]:
    if value is None:
        if default is None:
            raise TokenError("token carries no database role")
        roles = [default]
    elif isinstance(value, str):
        roles = [value]
    elif isinstance(value, list):
        if not all(isinstance(r, str) for r in value):
            raise _invalid(name)
        # An explicit empty list means "no roles": don't fall back to the default.
        if not value:
            raise TokenError("token carries no database role")
        roles = list(value)
    else:
        raise _invalid(name)
    if not all(valid_role_name(r) for r in roles):
        raise _invalid(name)
    return _dedupe(roles)


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if value is None:
        raise TokenError(f"missing claim: {name}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(name)
    return float(value)


def identity_from_claims(claims: Mapping[str, Any], names: ClaimNames, default_db_role: str | None,
                         token_id: str) -> Identity:
    """Build an Identity from verified claims, mapping claim names through ``names``.

    Raises TokenError for a missing or malformed claim (the reason names the claim) and when no
    database role results (``token carries no database role``).
    """
    subject = claims.get(names.subject)
    if subject is None:
        raise TokenError(f"missing claim: {names.subject}")
    if not isinstance(subject, str) or not subject:
        raise _invalid(names.subject)
    issuer = claims.get("iss")
    if issuer is None:
        raise TokenError("missing claim: iss")
    if not isinstance(issuer, str):
        raise _invalid("iss")
    expires_at = _numeric_date(claims, "exp")
    if default_db_role is not None and not valid_role_name(default_db_role):
        raise TokenError("invalid default database role")
    return Identity(
        subject=subject,
        groups=_groups(claims.get(names.groups), names.groups),
        db_roles=_db_roles(claims.get(names.db_role), names.db_role, default_db_role),
        agent_id=_optional_str(claims, names.agent_id),
        session_id=_optional_str(claims, names.session_id),
        tool_call_id=_optional_str(claims, names.tool_call_id),
        token_id=token_id,
        issuer=issuer,
        expires_at=expires_at,
        claims=_freeze(claims),
    )
