"""Helpers shared by the approvals tests (importable by name, unlike conftest modules)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pgproxy.identity import DevKeys, mint_token
from pgproxy.policy.approval_factory import new_request
from pgproxy.policy.approvals import ApprovalRequest, ApprovalStore

StoreFactory = Callable[..., ApprovalStore]



def make_request(clock: Callable[[], float] | None = None, *, subject: str = "agent-1", sql: str = "DELETE FROM t",
                 params: list[str | None] | None = None, groups: list[str] | None = None, quorum: int = 1,
                 expiry: float = 600.0, mode: str = "refuse") -> ApprovalRequest:
    return new_request(
        requester={"subject": subject, "groups": ["agents"], "agent_id": "bot-7"}, database="app", sql=sql,
        params=params or [], classification={"classes": ["write"], "tables": ["t"], "reasons": ["DELETE on t"]},
        rule="writes-need-approval", approver_groups=groups or ["dba", "oncall"], required_approvals=quorum,
        mode=mode,  # type: ignore[arg-type]
        reason="cleanup", expiry_seconds=expiry, now=clock() if clock else None)


# --------------------------------------------------------------------------------------------------
# Approver tokens (real JWTs signed with the session's dev keys)

ISSUER = "https://issuer.test"
AUDIENCE = "pgproxy-test"


def base_config_data(keys: DevKeys, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["ES256"],
                     "jwks_file": str(keys.jwks_file), "leeway_seconds": 0},
        "upstream": {"credentials": [{"role": "*"}]},
    }
    data.update(sections)
    return data


def mint(keys: DevKeys, sub: str, groups: list[str], ttl: float = 600) -> str:
    return mint_token(keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject=sub, groups=groups,
                      db_role=["agent_reader"], ttl_seconds=ttl)
