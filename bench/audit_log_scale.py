"""How reopening and verifying the signed audit log scale with its size.

Writes a log of ``--records`` records (sessions of statements, as the proxy writes them, through the
same emitter), then times in the same run:

- reopening it as `pgproxy serve` does, from the saved resume point (only the tail is read);
- reopening it without a resume point (every record read, as before resume points existed);
- `pgproxy audit verify` (every record read and checked against the pinned key).

and prints the ratios. With ``--store`` it also starts a throwaway PostgreSQL cluster, ships the log
to the central store (as the proxy's background shipper does, from an empty store: the catch-up after
an outage), and times `pgproxy audit search` queries and `pgproxy audit check-store`. Run:

    .venv/bin/python bench/audit_log_scale.py [--records 1000000] [--store] [--dir DIR] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from pgproxy.audit.events import AuditEmitter
from pgproxy.audit.keys import generate_key, load_private_key
from pgproxy.audit.logformat import RESUME_FILE
from pgproxy.audit.signed import SignedAuditLog
from pgproxy.audit.verify import TrustAnchor, verify_log

STATEMENTS_PER_SESSION = 48


def write_log(directory: Path, key: Path, records: int) -> float:
    """Seconds to write ``records`` records (fsync never: this measures the log, not the disk)."""
    sink = SignedAuditLog(directory, load_private_key(key), fsync="never", checkpoint_every_records=1000)
    emitter = AuditEmitter(sink)
    started = time.perf_counter()
    written, session = 0, 0
    while written < records:
        sid = f"{session:016x}"
        emitter.emit({"event": "session_start", "session": sid, "identity": {"subject": f"agent-{session % 97}"},
                      "client": "10.0.0.1:5555", "tls": True, "database": "app", "upstream_role": "agent_reader",
                      "application_name": "bench"})
        written += 1
        for i in range(min(STATEMENTS_PER_SESSION, records - written - 2)):
            emitter.emit({"event": "statement", "session": sid, "protocol": "extended",
                          "sql": "SELECT abalance FROM pgbench_accounts WHERE aid = $1", "params": [str(i)],
                          "started_at": 1.0, "duration_ms": 0.2, "tags": ["SELECT 1"], "rows": 1,
                          "result": {"rows_sent": 1, "row_digest": "0" * 64, "sample_rows": [["42"]]}})
            written += 1
        emitter.emit({"event": "policy_decision", "session": sid, "kind": "query",
                      "sql": f"DELETE FROM orders_{session % 13} WHERE id = {session}",
                      "decision": "deny" if session % 50 == 0 else "allow", "rule": "bench",
                      "classes": ["write"], "tables": [f"public.orders_{session % 13}"], "reasons": []})
        written += 1
        emitter.emit({"event": "session_end", "session": sid, "reason": "client terminated",
                      "statements": STATEMENTS_PER_SESSION, "duration_s": 0.1})
        written += 1
        session += 1
        if session % 200 == 0:
            emitter.flush()
    emitter.close()
    return time.perf_counter() - started


def timed_reopen(directory: Path, key: Path) -> float:
    started = time.perf_counter()
    SignedAuditLog(directory, load_private_key(key), fsync="never").close()
    return time.perf_counter() - started


def store_lines(log_dir: Path, pub: Path) -> list[str]:
    """Ship the log to a throwaway cluster's store; time shipping, searches and the store check."""
    import psycopg

    from pgproxy.audit.store import BATCH, SearchFilters, StoreShipper, check_store, schema_sql, search
    from pgproxy.devdb import TemporaryCluster

    cluster = TemporaryCluster(extra_conf={"fsync": "off", "shared_buffers": "256MB"})
    dsn = cluster.start().dsn()
    try:
        shipper = StoreShipper(log_dir, dsn, "pgproxy_audit")
        with psycopg.connect(dsn, autocommit=True) as conn:
            for statement in schema_sql("pgproxy_audit"):
                conn.execute(statement)
            started = time.perf_counter()
            while shipper.ship_once(conn) >= BATCH:
                pass
            ship_s = time.perf_counter() - started
            conn.execute("ANALYZE pgproxy_audit.records")
            t0, t1 = conn.execute("SELECT min(ts), max(ts) FROM pgproxy_audit.records").fetchone()  # type: ignore[misc]
        shipped = shipper.shipped
        middle = (t0 + t1) / 2
        queries = {
            "--subject agent-42 (first 100)": SearchFilters(subject="agent-42"),
            "--subject agent-42 --kind statement --since/--until (1 s)":
                SearchFilters(subject="agent-42", kind="statement", since=middle, until=middle + 1),
            "--decision deny": SearchFilters(decision="deny"),
            "--table public.orders_7 --decision deny": SearchFilters(table="public.orders_7", decision="deny"),
            "--text orders_7 (full text)": SearchFilters(text="orders_7"),
            "--session <one session>": SearchFilters(session=f"{7:016x}", limit=1000),
        }
        lines = ["", f"## Central store (PostgreSQL, {shipped:,} records shipped)", "",
                 "| operation | seconds | rows |", "|---|---:|---:|",
                 f"| ship every record (catch-up from an empty store) | {ship_s:.1f} | {shipped:,} |"]
        for name, query in queries.items():
            search(dsn, "pgproxy_audit", query)  # warm
            started = time.perf_counter()
            hits = search(dsn, "pgproxy_audit", query)
            lines.append(f"| `pgproxy audit search {name}` | {time.perf_counter() - started:.3f} | {len(hits)} |")
        lines.append("")
        lines.append("Search times include opening the connection to the store, as the command does.")
        started = time.perf_counter()
        report = check_store(dsn, "pgproxy_audit", TrustAnchor.from_files([pub], "bench"))
        assert report.ok, report.problems
        lines.insert(-2, f"| `pgproxy audit check-store` (every row against the signed roots) | "
                         f"{time.perf_counter() - started:.1f} | {sum(report.logs.values()):,} |")
        return lines
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="Where to write the log (default: a temp dir).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the Markdown report here.")
    parser.add_argument("--store", action="store_true", help="Also ship to a throwaway PostgreSQL and search it.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        key = work / "signing.key"
        pub, _ = generate_key(key)
        log_dir = work / "log"
        write_s = write_log(log_dir, key, args.records)
        size = sum(p.stat().st_size for p in log_dir.iterdir() if p.is_file())
        resume_s = timed_reopen(log_dir, key)
        (log_dir / RESUME_FILE).unlink()
        full_s = timed_reopen(log_dir, key)  # saves the resume point again at close
        started = time.perf_counter()
        report = verify_log(log_dir, anchor=TrustAnchor.from_files([pub], "bench"))
        verify_s = time.perf_counter() - started
        assert report.ok, report.problems
        records = report.records
        lines = [
            f"# Signed audit log at {records:,} records ({size / 1e6:.0f} MB)",
            "",
            "| operation | seconds | records/s |",
            "|---|---:|---:|",
            f"| write (fsync never, checkpoint every 1000) | {write_s:.2f} | {records / write_s:,.0f} |",
            f"| reopen from the resume point (serve start) | {resume_s:.3f} | |",
            f"| reopen reading every record (no resume point) | {full_s:.2f} | {records / full_s:,.0f} |",
            f"| `pgproxy audit verify --pubkey` | {verify_s:.2f} | {records / verify_s:,.0f} |",
            "",
            f"Reopening from the resume point is {full_s / resume_s:,.0f}x faster than reading the whole log; "
            f"verify reads every record ({verify_s / resume_s:,.0f}x the resumed reopen).",
        ]
        if args.store:
            lines += store_lines(log_dir, pub)
        text = "\n".join(lines)
        print(text)
        if args.out is not None:
            args.out.write_text(text + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
