"""The approval rules, for both stores (SQLite file and real PostgreSQL) through one parametrized fixture."""

from __future__ import annotations

import asyncio

import pytest
from approval_helpers import StoreFactory, make_request
from harness import FakeClock

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.policy.approvals import (
    ApprovalConflict,
    ApprovalError,
    ApprovalForbidden,
    ApprovalNotFound,
    ApprovalRequest,
    ApprovalStore,
    ApprovalStoreUnavailable,
)
from pgproxy.policy.stores.postgres import PostgresApprovalStore
from pgproxy.policy.stores.sqlite import SQLiteApprovalStore


async def test_create_get_and_list(store: ApprovalStore, clock: FakeClock, audit: MemoryAuditSink) -> None:
    req = make_request(clock, sql="DELETE FROM t WHERE id = $1", params=["7", None])
    stored = await store.create(req)
    assert stored.id == req.id and stored.status == "pending" and stored.decisions == []
    got = await store.get(req.id)
    assert got is not None
    assert (got.sql, got.params, got.requester["subject"], got.classification["reasons"], got.rule) == (
        "DELETE FROM t WHERE id = $1", ["7", None], "agent-1", ["DELETE on t"], "writes-need-approval")
    assert await store.get("apr_missing") is None
    assert [r.id for r in await store.list("pending")] == [req.id]
    assert await store.list("approved") == []
    assert [e["event"] for e in audit.events] == ["approval_requested"]
    assert audit.events[0]["approval_id"] == req.id


async def test_create_deduplicates_by_fingerprint(store: ApprovalStore, clock: FakeClock) -> None:
    first = await store.create(make_request(clock))
    again = await store.create(make_request(clock))
    assert again.id == first.id
    other = await store.create(make_request(clock, params=["x"]))
    assert other.id != first.id
    await store.decide(first.id, "alice", ["dba"], True, None)
    assert (await store.create(make_request(clock))).id == first.id  # approved: still the same
    assert await store.consume(first.fingerprint) is not None
    fresh = await store.create(make_request(clock))  # used: a new request
    assert fresh.id != first.id and fresh.status == "pending"
    assert len(await store.list()) == 3


async def test_self_approval_refused(store: ApprovalStore, clock: FakeClock) -> None:
    req = await store.create(make_request(clock, subject="alice"))
    with pytest.raises(ApprovalForbidden, match="own request"):
        await store.decide(req.id, "alice", ["dba"], True, "me")
    with pytest.raises(ApprovalForbidden):
        await store.decide(req.id, "alice", ["dba"], False, "me")
    got = await store.get(req.id)
    assert got is not None and got.status == "pending" and got.decisions == []


async def test_wrong_group_refused_and_groups_are_or(store: ApprovalStore, clock: FakeClock) -> None:
    req = await store.create(make_request(clock, groups=["dba", "oncall"]))
    with pytest.raises(ApprovalForbidden, match="approver group"):
        await store.decide(req.id, "mallory", ["developers"], True, None)
    with pytest.raises(ApprovalForbidden):
        await store.decide(req.id, "mallory", [], True, None)
    decided = await store.decide(req.id, "bob", ["developers", "oncall"], True, "ok")  # any one group is enough
    assert decided.status == "approved"
    assert issubclass(ApprovalForbidden, ApprovalError)


async def test_quorum_of_two_distinct_approvers(store: ApprovalStore, clock: FakeClock,
                                                audit: MemoryAuditSink) -> None:
    req = await store.create(make_request(clock, quorum=2))
    one = await store.decide(req.id, "alice", ["dba"], True, "looks fine")
    assert one.status == "pending"
    with pytest.raises(ApprovalConflict, match="already decided"):
        await store.decide(req.id, "alice", ["dba"], True, "again")
    assert await store.consume(req.fingerprint) is None
    two = await store.decide(req.id, "bob", ["oncall"], True, None)
    assert two.status == "approved"
    assert [(d.approver, d.approve, d.reason) for d in two.decisions] == [("alice", True, "looks fine"),
                                                                          ("bob", True, None)]
    stored = await store.get(req.id)
    assert stored is not None and [d.approver for d in stored.decisions] == ["alice", "bob"]
    assert all(d.at == clock.now for d in stored.decisions)
    with pytest.raises(ApprovalConflict, match="already approved"):
        await store.decide(req.id, "carol", ["dba"], True, None)
    decided = [e for e in audit.events if e["event"] == "approval_decided"]
    assert [(e["approver"], e["approve"], e["status"]) for e in decided] == [("alice", True, "pending"),
                                                                             ("bob", True, "approved")]


async def test_one_deny_denies(store: ApprovalStore, clock: FakeClock) -> None:
    req = await store.create(make_request(clock, quorum=2))
    await store.decide(req.id, "alice", ["dba"], True, None)
    denied = await store.decide(req.id, "bob", ["dba"], False, "too broad")
    assert denied.status == "denied"
    with pytest.raises(ApprovalConflict, match="denied"):
        await store.decide(req.id, "carol", ["dba"], True, None)
    assert await store.consume(req.fingerprint) is None
    # A denied request is closed: the same statement asks again with a new request.
    assert (await store.create(make_request(clock, quorum=2))).id != req.id


async def test_deny_revokes_an_unused_approval(store: ApprovalStore, clock: FakeClock) -> None:
    req = await store.create(make_request(clock))
    await store.decide(req.id, "alice", ["dba"], True, None)
    assert (await store.decide(req.id, "bob", ["dba"], False, "changed my mind")).status == "denied"
    assert await store.consume(req.fingerprint) is None


async def test_expiry(store: ApprovalStore, clock: FakeClock) -> None:
    pending = await store.create(make_request(clock, expiry=60))
    approved = await store.create(make_request(clock, expiry=60, sql="UPDATE t SET x = 1"))
    await store.decide(approved.id, "alice", ["dba"], True, None)
    clock.advance(61)
    assert (await store.get(pending.id)).status == "expired"  # type: ignore[union-attr]
    with pytest.raises(ApprovalConflict, match="expired"):
        await store.decide(pending.id, "alice", ["dba"], True, None)
    assert await store.consume(approved.fingerprint) is None  # an approval is usable until expires_at only
    assert {r.id for r in await store.list("expired")} == {pending.id, approved.id}
    assert await store.list("pending") == []
    assert (await store.create(make_request(clock, expiry=60))).id != pending.id


async def test_consume_exactly_once(store: ApprovalStore, clock: FakeClock, audit: MemoryAuditSink) -> None:
    req = await store.create(make_request(clock))
    assert await store.consume(req.fingerprint) is None  # pending
    await store.decide(req.id, "alice", ["dba"], True, None)
    used = await store.consume(req.fingerprint)
    assert used is not None and used.id == req.id and used.status == "used"
    assert await store.consume(req.fingerprint) is None
    assert (await store.get(req.id)).status == "used"  # type: ignore[union-attr]
    with pytest.raises(ApprovalConflict, match="used"):
        await store.decide(req.id, "bob", ["dba"], False, None)
    assert await store.consume("0" * 64) is None
    assert "approval_used" in [e["event"] for e in audit.events]


async def test_concurrent_consumers_exactly_one_wins(store_factory: StoreFactory, clock: FakeClock) -> None:
    """Two replicas (two store instances on the same storage) race for one approval, many times."""
    a, b = store_factory(), store_factory()
    for i in range(10):
        req = await a.create(make_request(clock, sql=f"DELETE FROM t WHERE id = {i}"))
        await b.decide(req.id, "alice", ["dba"], True, None)
        results = await asyncio.gather(a.consume(req.fingerprint), b.consume(req.fingerprint),
                                       a.consume(req.fingerprint), b.consume(req.fingerprint))
        assert sum(r is not None for r in results) == 1, results


async def test_unknown_id(store: ApprovalStore) -> None:
    with pytest.raises(ApprovalNotFound):
        await store.decide("apr_nope", "alice", ["dba"], True, None)
    with pytest.raises(ApprovalNotFound):
        await store.set_impact("apr_nope", {"rows": 1})
    with pytest.raises(ApprovalNotFound):
        await store.wait("apr_nope", 0.1)


async def test_set_impact(store: ApprovalStore, clock: FakeClock) -> None:
    req = await store.create(make_request(clock))
    await store.set_impact(req.id, {"rows": 3, "plan": [{"Plan": {"Node Type": "ModifyTable"}}]})
    got = await store.get(req.id)
    assert got is not None and got.impact == {"rows": 3, "plan": [{"Plan": {"Node Type": "ModifyTable"}}]}


async def _settled(task: asyncio.Task[ApprovalRequest], why: str) -> ApprovalRequest:
    """The result of a wait that must end now; a wait still going after 10 s of real time fails as ``why``."""
    try:
        return await asyncio.wait_for(task, 10)
    except TimeoutError:
        raise AssertionError(why) from None


async def test_wait_gives_up_at_its_timeout_on_the_store_clock(store_factory: StoreFactory, clock: FakeClock) -> None:
    """The wait's deadline is read from the store's clock: at +29 s of a 30 s wait it still waits, at +30 s it
    returns the request, still pending."""
    a = store_factory()
    req = await a.create(make_request(clock, quorum=2))
    waiting = asyncio.create_task(a.wait(req.id, 30))
    await asyncio.sleep(0)  # the wait has started: its deadline is set
    clock.advance(29)
    await a.decide(req.id, "alice", ["dba"], True, None)  # one approval of two: wakes the waiter, still pending
    done, _ = await asyncio.wait({waiting}, timeout=2)  # the waiter re-checked (woken, then polled)
    assert not done, "the wait gave up before its timeout"
    clock.advance(1)
    still = await _settled(waiting, "the wait went on past its timeout on the store's clock")
    assert still.status == "pending" and still.id == req.id


async def test_wait_returns_on_decision(store_factory: StoreFactory, clock: FakeClock) -> None:
    a = store_factory()
    req = await a.create(make_request(clock))
    waiting = asyncio.create_task(a.wait(req.id, 30))
    await a.decide(req.id, "alice", ["dba"], True, None)
    done = await _settled(waiting, "the decision did not end the wait")
    assert done.status == "approved"


async def test_wait_wakes_on_decision_from_another_instance(store_factory: StoreFactory, clock: FakeClock,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: LISTEN/NOTIFY wakes the waiter (its fallback poll is pushed out of reach here);
    SQLite: its poll sees the other instance's write."""
    if store_factory.kind == "postgres":  # type: ignore[attr-defined]
        monkeypatch.setattr("pgproxy.policy.stores.postgres.WAIT_FALLBACK_SECONDS", 3600.0)
    waiter, decider = store_factory(), store_factory()
    req = await waiter.create(make_request(clock))
    task = asyncio.create_task(waiter.wait(req.id, 30))
    await asyncio.sleep(0.3)  # the waiter is listening
    await decider.decide(req.id, "alice", ["dba"], False, "no")
    result = await _settled(task, "the waiter never learnt of the other instance's decision")
    assert result.status == "denied"


async def test_wait_returns_once_expired(store: ApprovalStore, clock: FakeClock) -> None:
    req = await store.create(make_request(clock, expiry=60))
    task = asyncio.create_task(store.wait(req.id, 10))
    await asyncio.sleep(0.2)
    clock.advance(61)
    result = await asyncio.wait_for(task, 3)
    assert result.status == "expired"


async def test_sqlite_unavailable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "file").write_text("not a directory")
    store = SQLiteApprovalStore(tmp_path / "file" / "approvals.sqlite3")
    with pytest.raises(ApprovalStoreUnavailable):
        await store.list()
    await store.close()


async def test_postgres_unavailable() -> None:
    store = PostgresApprovalStore("postgresql://nobody@127.0.0.1:1/none", connect_timeout=2)
    with pytest.raises(ApprovalStoreUnavailable):
        await store.create(make_request())
    await store.close()
