"""What `pgproxy audit show` prints for events a person reads: times and durations spelt out, no JSON."""

from __future__ import annotations

from pgproxy.audit.timeline import format_duration, format_event


def test_durations() -> None:
    assert format_duration(0.0004) == "0.4 ms"
    assert format_duration(0.0123) == "12 ms"
    assert format_duration(3.21) == "3.2 s"
    assert format_duration(245) == "4 min 05 s"
    assert format_duration(7300) == "2 h 01 min"
    assert format_duration(None) == "?"


def test_policy_and_approval_events_read_as_text() -> None:
    decision = {"event": "policy_decision", "ts": 1795566007.65, "session": "s", "decision": "deny",
                "rule": "no-code", "classes": ["procedural"], "reasons": ["DO block"],
                "identity": {"subject": "agent-9", "groups": ["agents"], "agent_id": None}}
    line = "\n".join(format_event(12, decision))
    assert line.startswith("#12     2026-11-25 00:20:07.650Z  policy_decision: ")
    assert "decision deny; rule no-code; classes procedural; reasons DO block" in line
    assert "identity subject agent-9, groups agents" in line
    assert "{" not in line and "[" not in line and "None" not in line
    approval = {"event": "approval", "ts": 1795566007.0, "session": "s", "approval_id": "apr_1",
                "expires_at": 1795569607.0, "status": "required"}
    assert "expires_at 2026-11-25 01:20:07.000Z" in format_event(1, approval)[0]
    end = {"event": "session_end", "ts": 1.0, "session": "s", "reason": "client terminated", "statements": 3,
           "duration_s": 75.4}
    assert format_event(2, end)[0].endswith("client terminated (3 statements in 1 min 15 s)")
