#!/usr/bin/env python3
"""Per-statement cost of analysing a never-seen statement with every control on (a micro-benchmark).

What a statement with fresh literals (as pgbench and LLM-written SQL send) costs the proxy before and after
it runs, without sockets or a database, through the code the gates and the audit log run:

- ``classify``: the policy's classification (``pgproxy.policy.classify.classify``) and the decision of the
  shipped default policy with an allow rule for the bench role (``Policy.decide``);
- ``mask plan``: the masking gate's plan (``Masking.rewrite``: rewrite or pass) for an identity with
  masking rules loaded for another table (``shop.customers``), over a catalog snapshot holding the pgbench
  tables and that one;
- ``audit record``: the ``statement`` event through the audit emitter into the signed log (redact,
  encode, hash, Merkle append; the lines are written at the next flush and signed per checkpoint, as in the
  proxy: those are outside the timed part).

Each statement text is used once (new aid/bid/tid/delta values each time), so no cache keyed by text can
help. It reports the median microseconds per statement of each step and of the three together.

Run: ``PYTHONPATH=. .venv/bin/python bench/statement_analysis.py [--statements 20000] [--rounds 3]
[--out bench/results/statement_analysis.md]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import pgproxy
from pgproxy.audit.events import AuditEmitter
from pgproxy.audit.signed import SignedAuditLog
from pgproxy.config import MaskingConfig, UpstreamConfig
from pgproxy.identity.claims import Identity
from pgproxy.masking.catalog import CatalogSnapshot, Column, MaskedSchema, Relation
from pgproxy.masking.engine import Masking
from pgproxy.masking.rules import MaskingRules, parse_rules
from pgproxy.policy.classify import classify
from pgproxy.policy.rules import Policy, load_policy, parse_policy

REPO = Path(__file__).resolve().parent.parent
BENCH_ROLE = "bench"

# name -> template; {aid} {bid} {tid} {delta} {n} {m} are fresh for every statement
STATEMENTS: dict[str, str] = {
    "pgbench -S": "SELECT abalance FROM pgbench_accounts WHERE aid = {aid};",
    "tpcb update accounts": "UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};",
    "tpcb select": "SELECT abalance FROM pgbench_accounts WHERE aid = {aid};",
    "tpcb update tellers": "UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};",
    "tpcb update branches": "UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};",
    "tpcb insert history": ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                            "VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);"),
    "llm select join": ("SELECT a.aid, a.abalance, b.bbalance FROM pgbench_accounts a JOIN pgbench_branches b "
                        "ON b.bid = a.bid WHERE a.abalance > {delta} AND a.filler LIKE 'x{n}%' "
                        "ORDER BY a.abalance DESC LIMIT {m}"),
    "llm select aggregate": ("SELECT bid, count(*) AS n, sum(abalance) AS total FROM pgbench_accounts "
                             "WHERE aid BETWEEN {aid} AND {aid} + {n} AND filler <> 'none' GROUP BY bid "
                             "HAVING count(*) > {m} ORDER BY total DESC"),
    "llm update": ("UPDATE pgbench_tellers SET filler = 'checked {n}' WHERE tid IN ({tid}, {bid}, {m}) "
                   "AND tbalance < {delta}"),
}
TPCB = tuple(k for k in STATEMENTS if k.startswith("tpcb"))


def fresh(template: str, rng: random.Random) -> str:
    return template.format(aid=rng.randint(1, 1_000_000), bid=rng.randint(1, 10), tid=rng.randint(1, 100),
                           delta=rng.randint(-5000, 5000), n=rng.randint(1, 10**9), m=rng.randint(1, 500))


def policy() -> Policy:
    """The shipped default policy, with an allow rule for the bench role first (as the proxy benchmarks run)."""
    shipped = load_policy(REPO / "pgproxy" / "policy" / "default_policy.yaml")
    allow = parse_policy({"rules": [{"name": "bench", "match": {"roles": [BENCH_ROLE]}, "action": "allow"}],
                          "default": "deny"})
    return Policy(allow.rules + shipped.rules, shipped.default)


def catalog() -> CatalogSnapshot:
    def table(oid: int, schema: str, name: str, columns: list[tuple[str, str, str]]) -> Relation:
        return Relation(oid, schema, name, "r", tuple(Column(n, i + 1, t, tn, "S" if tn == "text" else "N")
                                                      for i, (n, t, tn) in enumerate(columns)))

    relations = {
        1: table(1, "public", "pgbench_accounts", [("aid", "integer", "int4"), ("bid", "integer", "int4"),
                                                   ("abalance", "integer", "int4"), ("filler", "character(84)",
                                                                                     "bpchar")]),
        2: table(2, "public", "pgbench_branches", [("bid", "integer", "int4"), ("bbalance", "integer", "int4"),
                                                   ("filler", "character(88)", "bpchar")]),
        3: table(3, "public", "pgbench_tellers", [("tid", "integer", "int4"), ("bid", "integer", "int4"),
                                                  ("tbalance", "integer", "int4"), ("filler", "character(84)",
                                                                                    "bpchar")]),
        4: table(4, "public", "pgbench_history", [("tid", "integer", "int4"), ("bid", "integer", "int4"),
                                                  ("aid", "integer", "int4"), ("delta", "integer", "int4"),
                                                  ("mtime", "timestamp without time zone", "timestamp"),
                                                  ("filler", "character(22)", "bpchar")]),
        5: table(5, "shop", "customers", [("id", "integer", "int4"), ("email", "text", "text"),
                                          ("ssn", "text", "text")]),
    }
    names = frozenset((r.schema, r.name) for r in relations.values())
    return CatalogSnapshot(1, relations, {}, {}, {}, frozenset(), {(r.schema, r.name): o for o, r in relations.items()},
                           frozenset(), names, frozenset(n for _, n in names))


def masking() -> tuple[Masking, MaskedSchema, tuple[str, ...]]:
    rules = parse_rules({"tables": {"shop.customers": {"columns": {"email": "email", "ssn": {
        "mask": "partial", "keep_last": 4}}}}}, REPO / "bench.yaml")
    engine = Masking(MaskingConfig(rules_dir=REPO / "masking_rules"), UpstreamConfig.model_construct(),
                     MaskingRules(rules))
    schema = engine.schema_for(catalog(), rules)
    return engine, schema, tuple(r.where for r in rules)


def measure(template: str, statements: int, seed: int, audit_dir: Path) -> dict[str, float]:
    """Median microseconds per never-seen statement of each step and of all three."""
    rng = random.Random(seed)
    rules = policy()
    caller = Identity(subject="bench-agent", groups=("agents",), db_roles=(BENCH_ROLE,), agent_id="bench",
                      session_id=None, tool_call_id=None, token_id="bench", issuer="bench", expires_at=4e9, claims={})
    engine, schema, rules_key = masking()
    sink = SignedAuditLog(audit_dir, Ed25519PrivateKey.generate(), fsync="never", checkpoint_every_records=10**9,
                          checkpoint_every_seconds=10**9)
    emitter = AuditEmitter(sink)
    texts = [fresh(template, rng) for _ in range(statements)]
    clock = time.perf_counter_ns
    steps: dict[str, list[int]] = {"classify": [], "mask plan": [], "audit record": [], "total": []}
    try:
        for i, sql in enumerate(texts):
            t0 = clock()
            decision = rules.decide(caller, classify(sql), "bench", BENCH_ROLE)
            t1 = clock()
            plan = engine.rewrite(schema, rules_key, sql)
            t2 = clock()
            event: dict[str, Any] = {"event": "statement", "protocol": "simple", "sql": sql, "started_at": 1.7e9,
                                     "duration_ms": 0.25, "tags": ["SELECT 1"], "rows": 1, "session": "s1"}
            if plan.relations:
                event["masked_relations"] = list(plan.relations)
            emitter.emit(event)
            t3 = clock()
            if decision.action != "allow" or plan.refusal is not None or plan.sql is not None:
                raise RuntimeError(f"{sql!r}: unexpected {decision} / {plan}")
            steps["classify"].append(t1 - t0)
            steps["mask plan"].append(t2 - t1)
            steps["audit record"].append(t3 - t2)
            steps["total"].append(t3 - t0)
            if i % 1000 == 999:
                sink.flush()  # the proxy writes every ~0.2 s, outside the statement's path
    finally:
        sink.close()
    return {k: statistics.median(v) / 1000 for k, v in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--statements", type=int, default=20000, help="never-seen statements per template")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median round is reported")
    parser.add_argument("--out", type=Path, help="write a markdown report here")
    parser.add_argument("--label", default="", help="a label for the report (e.g. the code measured)")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in STATEMENTS}
    for r in range(args.rounds):
        for name, template in STATEMENTS.items():
            with tempfile.TemporaryDirectory(prefix="pgproxy-analysis-") as tmp:
                results[name].append(measure(template, args.statements, seed=hash((r, name)) & 0xFFFF,
                                             audit_dir=Path(tmp)))
    rows = []
    for name, runs in results.items():
        median_run = sorted(runs, key=lambda m: m["total"])[len(runs) // 2]
        rows.append((name, median_run))
    tpcb = statistics.median(m["total"] for name, m in rows if name in TPCB)
    header = "| statement | classify + decide µs | mask plan µs | audit record µs | total µs |\n|---|---|---|---|---|"
    lines = [header] + [f"| {name} | {m['classify']:.1f} | {m['mask plan']:.1f} | {m['audit record']:.1f} | "
                        f"**{m['total']:.1f}** |" for name, m in rows]
    table = "\n".join(lines)
    print(table)
    code = Path(pgproxy.__file__).parent.parent
    print(f"median of the TPC-B statements: {tpcb:.1f} µs (pgproxy from {code})")
    if args.out is not None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        text = (f"## {args.label or 'statement analysis'} ({stamp})\n\n"
                f"`bench/statement_analysis.py --statements {args.statements} --rounds {args.rounds}`"
                f" (pgproxy from `{code}`) on {platform.python_implementation()} {platform.python_version()}, "
                f"{args.statements} never-seen statements per row, median round of {args.rounds}.\n\n{table}\n\n"
                f"Median of the five TPC-B statements: {tpcb:.1f} µs.\n\n")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
