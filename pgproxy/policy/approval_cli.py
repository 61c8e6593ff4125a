"""The logic behind ``pgproxy approvals ...``: talk to the configured store as a verified approver.

``cli.py`` only parses arguments; everything here returns text (or raises ApprovalCLIError with a
one-line message) so that it can be tested without a terminal.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from pgproxy.config import ConfigError, ProxyConfig
from pgproxy.identity import TokenError, TokenVerifier
from pgproxy.policy.approval_factory import build_approval_store
from pgproxy.policy.approval_service import ApproverService, approver_view
from pgproxy.policy.approvals import ApprovalError, ApprovalRequest, ApprovalStatus, ApprovalStoreUnavailable

APPROVER_TOKEN_ENV = "PGPROXY_APPROVER_TOKEN"


class ApprovalCLIError(Exception):
    """One line for stderr; the command exits non-zero."""


def _ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_list(requests: list[ApprovalRequest]) -> str:
    if not requests:
        return "no approval requests"
    lines = [f"{'ID':<21} {'STATUS':<9} {'REQUESTER':<20} {'RULE':<24} {'EXPIRES':<20} SQL"]
    for r in requests:
        sql = " ".join(r.sql.split())
        sql = sql if len(sql) <= 60 else sql[:59] + "…"
        lines.append(f"{r.id:<21} {r.status:<9} {str(r.requester.get('subject', ''))[:20]:<20} "
                     f"{r.rule[:24]:<24} {_ts(r.expires_at):<20} {sql}")
    return "\n".join(lines)


def _requester(who: dict[str, object]) -> str:
    """``alice (groups agents, dba; agent a-1; tool call t-9)``: only what the token carried."""
    groups = who.get("groups")
    parts = [f"groups {', '.join(map(str, groups))}" if isinstance(groups, list) and groups else "no groups"]
    for key, label in (("agent_id", "agent"), ("session_id", "session"), ("tool_call_id", "tool call")):
        if who.get(key):
            parts.append(f"{label} {who[key]}")
    return f"{who.get('subject')} ({'; '.join(parts)})"


def _parameter(value: str | None) -> str:
    """A parameter as SQL would spell it: NULL, or a quoted literal (exact, quotes doubled)."""
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


def format_request(request: ApprovalRequest) -> str:
    """The approver view in plain text: nothing is elided, the SQL and parameters are exact."""
    r = request
    who = r.requester
    lines = [
        f"Approval {r.id}: {r.status} (mode {r.mode})",
        f"  requested  {_ts(r.created_at)}, expires {_ts(r.expires_at)}",
        f"  requester  {_requester(who)}",
        f"  database   {r.database}",
        f"  rule       {r.rule}",
        f"  reasons    {'; '.join(map(str, r.classification.get('reasons') or [])) or '-'}",
        f"  classes    {', '.join(map(str, r.classification.get('classes') or [])) or '-'}   "
        f"tables {', '.join(map(str, r.classification.get('tables') or [])) or '-'}",
        f"  caller's reason  {r.reason or '-'}",
        f"  approvers  {r.required_approvals} needed from any of: {', '.join(r.approver_groups)}",
        "  SQL:",
        *("    " + line for line in r.sql.splitlines() or [""]),
        *([f"  parameters {len(r.params)}:"] if r.params else ["  parameters none"]),
        *(f"    ${i} = {_parameter(v)}" for i, v in enumerate(r.params, 1)),
    ]
    if r.impact is None:
        lines.append("  impact     (not estimated)")
    else:
        if "rows" in r.impact:
            lines.append(f"  impact     would touch {r.impact['rows']} row(s)")
        if "estimated_rows" in r.impact:
            lines.append(f"             planner estimate {r.impact['estimated_rows']} row(s)")
        if "error" in r.impact:
            lines.append(f"  impact     estimate failed: {r.impact['error']}")
    if r.decisions:
        lines.append("  decisions:")
        for d in r.decisions:
            lines.append(f"    {_ts(d.at)}  {'approved' if d.approve else 'denied':<8} by {d.approver}"
                         + (f": {d.reason}" if d.reason else ""))
    else:
        lines.append("  decisions: none yet")
    return "\n".join(lines)


async def run_approvals_command(config: ProxyConfig, token: str | None, action: str, approval_id: str | None = None,
                                *, status: ApprovalStatus | None = None, reason: str | None = None,
                                as_json: bool = False) -> str:
    """Run one ``pgproxy approvals`` action; returns the text to print."""
    if not token:
        raise ApprovalCLIError(f"no approver token: pass --token or set {APPROVER_TOKEN_ENV}")
    try:
        verifier = TokenVerifier(config.identity)
        store = build_approval_store(config)
    except ConfigError as exc:
        raise ApprovalCLIError(str(exc)) from None
    service = ApproverService(store, verifier)
    try:
        try:
            identity = await service.authenticate(token)
        except TokenError as exc:
            raise ApprovalCLIError(f"approver token refused: {exc.reason}") from None
        if action == "list":
            requests = await service.list(identity, status)
            if as_json:
                return json.dumps([approver_view(r, identity) for r in requests], indent=2, default=str)
            return format_list(requests)
        assert approval_id is not None
        if action == "show":
            request = await service.show(identity, approval_id)
        elif action in ("approve", "deny"):
            request = await service.decide(identity, approval_id, action == "approve", reason)
        else:
            raise ApprovalCLIError(f"unknown action {action}")
        if as_json:
            return json.dumps(approver_view(request, identity), indent=2, default=str)
        if action == "show":
            return format_request(request)
        return f"{'approved' if action == 'approve' else 'denied'} {request.id} as {identity.subject}: " \
               f"request is now {request.status}"
    except ApprovalError as exc:
        raise ApprovalCLIError(str(exc)) from None
    except ApprovalStoreUnavailable as exc:
        raise ApprovalCLIError(f"approval store unavailable: {exc}") from None
    finally:
        await store.close()

