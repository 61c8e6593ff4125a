"""Bounded soak of pgproxy: many connections held open plus a mixed asyncpg workload, for minutes.

Starts a throwaway PostgreSQL (``pgproxy.devdb.TemporaryCluster`` with max_connections raised) and
``pgproxy serve`` as its own process, then through the proxy:

- opens ``--connections`` (default 1,000) sessions and holds them open, each pinged every 30 s
  (or every third of the duration when shorter);
- runs ``--workers`` asyncpg clients doing a mix of reads, read-write transactions, explicit prepared
  statements, simple-protocol queries, 1,000-row results and reconnects, for ``--duration`` seconds;
- samples the proxy process every ``--sample-interval`` seconds: resident memory (VmRSS), open file
  descriptors, CPU seconds, sessions, operations completed.

It reports errors (goal: 0), throughput, p50/p99 latency per operation and the proxy's memory over time
(goal: flat) as Markdown (``--out``, default bench/results/soak.md). Everything is on loopback; every loop
is bounded by the duration; the cluster, the proxy and temp files are removed on exit (Ctrl-C, SIGTERM).

    .venv/bin/python bench/soak.py                          # 1,000 held + 16 workers, 3 minutes
    .venv/bin/python bench/soak.py --connections 200 --duration 20 --out /tmp/soak.md

The core (``run_soak``) is reused by tests/integration/test_soak_small.py with a small budget.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "soak.md"
ISSUER = "https://issuer.soak"
AUDIENCE = "pgproxy-soak"
ROLE = "soak_rw"
PASSWORD_ENV = "PGPROXY_SOAK_UPSTREAM_PASSWORD"
ACCOUNTS = 100_000


# ------------------------------------------------------------------------------------------------
# measuring a process


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (KiB), open fds, CPU seconds (utime + stime) of ``pid``."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    out["cpu_ms"] = int((int(fields[11]) + int(fields[12])) * 1000 / ticks)
    return out


def raise_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(need, soft)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        raise SystemExit(f"need {need} file descriptors, the hard limit allows {soft}")
    return soft


# ------------------------------------------------------------------------------------------------
# the workload


@dataclass
class Sample:
    t: float  # seconds since the workload started
    rss_kib: int
    hwm_kib: int
    fds: int
    cpu_ms: int
    ops: int
    errors: int
    held: int


@dataclass
class SoakResult:
    connections: int
    workers: int
    duration: float
    connect_seconds: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    held_ok_at_end: int = 0
    rss_before_kib: int = 0
    rss_after_close_kib: int = 0
    fds_before: int = 0
    fds_after_close: int = 0
    workload_seconds: float = 0.0

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    def error(self, kind: str, exc: BaseException) -> None:
        key = f"{kind}: {type(exc).__name__}"
        self.errors[key] += 1
        self.error_examples.setdefault(key, str(exc)[:300])

    def rss_growth_kib(self, warmup: float) -> int:
        """RSS at the end of the run minus RSS at the first sample after ``warmup`` seconds."""
        after = [s for s in self.samples if s.t >= warmup]
        if len(after) < 2:
            return 0
        return after[-1].rss_kib - after[0].rss_kib


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def prepare_schema(superuser_dsn: str, role: str, rows: int = ACCOUNTS) -> None:
    conn = await asyncpg.connect(superuser_dsn)
    try:
        await conn.execute("""
            create table if not exists soak_accounts (aid int primary key, abalance int not null default 0,
                                                      filler text not null default repeat('f', 80));
            create table if not exists soak_history (id bigserial primary key, aid int, delta int,
                                                     at timestamptz default now());
        """)
        if await conn.fetchval("select count(*) from soak_accounts") < rows:
            await conn.execute("truncate soak_accounts")
            await conn.execute("insert into soak_accounts (aid) select g from generate_series(1, $1) g", rows)
            await conn.execute("analyze soak_accounts")
        await conn.execute(f"grant select, insert, update on soak_accounts, soak_history to {role}")
        await conn.execute(f"grant usage on sequence soak_history_id_seq to {role}")
    finally:
        await conn.close()


async def _worker(n: int, connect: Callable[[str], Any], result: SoakResult, stop_at: float,
                  rng: random.Random) -> None:
    conn = None
    stmt = None
    while time.monotonic() < stop_at:
        op = "connect"
        try:
            if conn is None:
                conn = await connect(f"worker-{n}")
                stmt = await conn.prepare("select abalance, filler from soak_accounts where aid = $1")
            op = rng.choices(["read", "write", "prepared", "simple", "big", "reconnect"],
                             weights=[40, 20, 25, 10, 4, 1])[0]
            aid = rng.randint(1, ACCOUNTS)
            t0 = time.perf_counter()
            if op == "read":
                row = await conn.fetchrow("select aid, abalance from soak_accounts where aid = $1", aid)
                assert row is not None and row["aid"] == aid
            elif op == "write":
                delta = rng.randint(-500, 500)
                async with conn.transaction():
                    await conn.execute("update soak_accounts set abalance = abalance + $1 where aid = $2", delta, aid)
                    await conn.execute("insert into soak_history (aid, delta) values ($1, $2)", aid, delta)
            elif op == "prepared":
                assert stmt is not None
                row = await stmt.fetchrow(aid)
                assert row is not None
            elif op == "simple":
                await conn.execute(f"select count(*) from soak_accounts where aid between {aid} and {aid + 100}")
            elif op == "big":
                rows = await conn.fetch("select * from soak_accounts where aid > $1 order by aid limit 1000",
                                        rng.randint(0, ACCOUNTS - 1000))
                assert len(rows) == 1000
            else:
                await conn.close()
                conn = await connect(f"worker-{n}")
                stmt = await conn.prepare("select abalance, filler from soak_accounts where aid = $1")
            result.latencies[op].append((time.perf_counter() - t0) * 1000)
            result.ops[op] += 1
        except Exception as exc:
            result.error(f"worker {op}", exc)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.terminate()
            conn = None
            await asyncio.sleep(0.2)
    if conn is not None:
        await conn.close()


async def _holder(conn: Any, result: SoakResult, stop_at: float, rng: random.Random,
                  alive: list[bool], index: int, interval: float) -> None:
    await asyncio.sleep(min(rng.uniform(0, interval), max(0.0, stop_at - time.monotonic())))
    while time.monotonic() < stop_at:
        try:
            t0 = time.perf_counter()
            assert await conn.fetchval("select 1") == 1
            result.latencies["held ping"].append((time.perf_counter() - t0) * 1000)
            result.ops["held ping"] += 1
        except Exception as exc:
            result.error("held ping", exc)
            alive[index] = False
            return
        await asyncio.sleep(min(interval, max(0.0, stop_at - time.monotonic())))


async def run_soak(*, connect: Callable[[str], Any], proxy_pid: int, connections: int, workers: int,
                   duration: float, sample_interval: float = 10.0, seed: int = 1,
                   log: Callable[[str], None] = lambda s: None, sessions: Callable[[], int] | None = None,
                   ) -> SoakResult:
    """Hold ``connections`` sessions open and run ``workers`` clients for ``duration`` seconds.

    ``connect(subject)`` opens an asyncpg connection through the proxy as that token subject;
    ``proxy_pid`` is the process whose memory is sampled.
    """
    rng = random.Random(seed)
    result = SoakResult(connections, workers, duration)
    before = proc_status(proxy_pid)
    result.rss_before_kib, result.fds_before = before["VmRSS"], before["fds"]

    # 1. open the held connections, a bounded number at a time
    t0 = time.monotonic()
    held: list[Any] = []
    gate = asyncio.Semaphore(50)

    async def open_one(i: int) -> None:
        async with gate:
            try:
                held.append(await connect(f"holder-{i}"))
            except Exception as exc:
                result.error("hold connect", exc)

    await asyncio.gather(*(open_one(i) for i in range(connections)))
    result.connect_seconds = time.monotonic() - t0
    log(f"{len(held)} connections open in {result.connect_seconds:.1f} s")

    # 2. the workload, sampled
    start = time.monotonic()
    stop_at = start + duration
    alive = [True] * len(held)
    tasks = [asyncio.create_task(_worker(n, connect, result, stop_at, random.Random(rng.random())))
             for n in range(workers)]
    ping_interval = min(30.0, duration / 3)
    tasks += [asyncio.create_task(_holder(c, result, stop_at, random.Random(rng.random()), alive, i, ping_interval))
              for i, c in enumerate(held)]

    def sample() -> None:
        st = proc_status(proxy_pid)
        s = Sample(round(time.monotonic() - start, 1), st["VmRSS"], st["VmHWM"], st["fds"], st["cpu_ms"],
                   result.total_ops, result.total_errors, sum(alive))
        result.samples.append(s)
        log(f"t={s.t:6.1f}s rss={s.rss_kib / 1024:7.1f} MiB fds={s.fds} ops={s.ops} errors={s.errors}"
            + (f" sessions={sessions()}" if sessions else ""))

    sample()
    while time.monotonic() < stop_at:
        await asyncio.sleep(min(sample_interval, max(0.0, stop_at - time.monotonic())))
        sample()
    await asyncio.gather(*tasks)
    result.workload_seconds = time.monotonic() - start

    # 3. every held connection still works; then close everything and look at the proxy again
    async def final_ping(i: int, conn: Any) -> None:
        try:
            assert await conn.fetchval("select 'still here'") == "still here"
            result.held_ok_at_end += 1
        except Exception as exc:
            if alive[i]:
                result.error("held final ping", exc)

    await asyncio.gather(*(final_ping(i, c) for i, c in enumerate(held)))
    await asyncio.gather(*(c.close(timeout=10) for c in held), return_exceptions=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        after = proc_status(proxy_pid)
        if after["fds"] <= result.fds_before + 2:
            break
        await asyncio.sleep(0.2)
    after = proc_status(proxy_pid)
    result.rss_after_close_kib, result.fds_after_close = after["VmRSS"], after["fds"]
    return result


# ------------------------------------------------------------------------------------------------
# the report


def report(result: SoakResult, meta: dict[str, str]) -> str:
    lines = ["# pgproxy soak", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    total = result.total_ops
    workload_ops = total - result.ops.get("held ping", 0)
    lines += [
        f"- held connections: {result.connections} (opened in {result.connect_seconds:.1f} s; "
        f"{result.held_ok_at_end} answered at the end)",
        f"- workers: {result.workers}; workload duration {result.workload_seconds:.0f} s",
        "",
        "## Result",
        "",
        f"- **errors: {result.total_errors}** (goal 0)",
        f"- throughput: {workload_ops / max(result.workload_seconds, 1e-9):.0f} operations/s "
        f"({workload_ops} workload operations, {result.ops.get('held ping', 0)} pings of held connections)",
    ]
    warm = [s for s in result.samples if s.t >= 30] or result.samples
    if result.samples:
        first, last = warm[0], result.samples[-1]
        peak = max(s.rss_kib for s in result.samples)
        lines += [
            f"- proxy RSS: {result.rss_before_kib / 1024:.1f} MiB before connecting, "
            f"{first.rss_kib / 1024:.1f} MiB at t={first.t:.0f} s, {last.rss_kib / 1024:.1f} MiB at the end "
            f"(growth after warm-up {(last.rss_kib - first.rss_kib) / 1024:+.1f} MiB; peak {peak / 1024:.1f} MiB), "
            f"{result.rss_after_close_kib / 1024:.1f} MiB after every client closed",
            f"- proxy open fds: {result.fds_before} before, {max(s.fds for s in result.samples)} peak, "
            f"{result.fds_after_close} after close",
            f"- proxy CPU: {(last.cpu_ms - result.samples[0].cpu_ms) / 1000:.1f} s over the workload "
            f"({(last.cpu_ms - result.samples[0].cpu_ms) / 10 / max(result.workload_seconds, 1e-9):.0f}% of one core)",
        ]
    if result.errors:
        lines += ["", "## Errors", "", "| kind | count | example |", "| --- | ---: | --- |"]
        for key, count in result.errors.most_common():
            lines.append(f"| {key} | {count} | {result.error_examples[key].replace('|', '/')} |")
    lines += ["", "## Latency (ms, client side, through the proxy)", "",
              "| operation | count | ops/s | p50 | p99 | max |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for op in ["read", "write", "prepared", "simple", "big", "reconnect", "held ping"]:
        values = result.latencies.get(op, [])
        if not values:
            continue
        lines.append(f"| {op} | {len(values)} | {len(values) / max(result.workload_seconds, 1e-9):.1f} | "
                     f"{percentile(values, 50):.2f} | {percentile(values, 99):.2f} | {max(values):.2f} |")
    everything = [v for op, vs in result.latencies.items() if op != "held ping" for v in vs]
    if everything:
        lines.append(f"| **all workload** | {len(everything)} | {len(everything) / result.workload_seconds:.1f} | "
                     f"{percentile(everything, 50):.2f} | {percentile(everything, 99):.2f} | {max(everything):.2f} |")
    lines += ["", "## Proxy process over time", "",
              "| t (s) | RSS (MiB) | peak RSS (MiB) | open fds | CPU s | ops done | errors | held alive |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in result.samples:
        lines.append(f"| {s.t:.0f} | {s.rss_kib / 1024:.1f} | {s.hwm_kib / 1024:.1f} | {s.fds} | {s.cpu_ms / 1000:.1f} "
                     f"| {s.ops} | {s.errors} | {s.held} |")
    if everything:
        lines += ["", f"Overall p50 {statistics.median(everything):.2f} ms."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# standalone run: cluster + `pgproxy serve` + workload


def _pgproxy_command() -> list[str]:
    script = Path(sys.executable).parent / "pgproxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pgproxy"]


async def _main_async(args: argparse.Namespace, workdir: Path, cleanup: list[Callable[[], None]]) -> str:
    import subprocess
    import threading

    from pgproxy.devdb import TemporaryCluster, create_role
    from pgproxy.identity import generate_dev_keys, mint_token

    log = (lambda s: print(s, flush=True)) if not args.quiet else (lambda s: None)
    raise_fd_limit(3 * (args.connections + args.workers) + 200)
    upstream_slots = args.connections + args.workers * 2 + 50
    cluster = TemporaryCluster(extra_conf={"max_connections": str(upstream_slots), "shared_buffers": "256MB"})
    t0 = time.monotonic()
    db = cluster.start()
    cleanup.append(cluster.stop)
    log(f"cluster up on port {db.port} in {time.monotonic() - t0:.1f} s (max_connections {upstream_slots})")
    password = secrets.token_urlsafe(18)
    create_role(db, ROLE, password)
    await prepare_schema(db.dsn(), ROLE)

    keys = generate_dev_keys(workdir / "keys")
    config = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["ES256"], "jwks_file": str(keys.jwks_file)},
        "upstream": {"host": db.host, "port": db.port, "connect_timeout_seconds": 10,
                     "credentials": [{"role": ROLE, "password_env": PASSWORD_ENV}]},
        "limits": {"max_connections": args.connections + args.workers * 2 + 50,
                   "max_connections_per_identity": 100},
        "audit": {"jsonl_path": str(workdir / "audit.jsonl")},
    }
    config_file = workdir / "pgproxy.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = dict(os.environ, **{PASSWORD_ENV: password})
    proc = subprocess.Popen([*_pgproxy_command(), "--log-level", "WARNING", "serve", "-c", str(config_file)],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)

    def stop_proxy() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    cleanup.append(stop_proxy)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if "listening on ports" not in line:
        raise SystemExit(f"pgproxy serve did not start: {line}{proc.stderr.read()}")
    port = int(line.rsplit(" ", 1)[1])
    stderr_tail: list[str] = []

    def drain() -> None:
        assert proc.stderr is not None
        for text in proc.stderr:
            stderr_tail.append(text)
            del stderr_tail[:-50]

    threading.Thread(target=drain, daemon=True).start()
    log(f"pgproxy serve pid {proc.pid} on port {port}")

    tokens: dict[str, str] = {}

    async def connect(subject: str) -> Any:
        token = tokens.get(subject)
        if token is None:
            token = tokens[subject] = mint_token(keys.private_key_file, issuer=ISSUER, audience=AUDIENCE,
                                                 subject=subject, db_role=[ROLE],
                                                 ttl_seconds=args.duration + 3600)
        return await asyncpg.connect(host="127.0.0.1", port=port, user=ROLE, password=token, database="postgres",
                                     ssl=False, timeout=30, command_timeout=60)

    result = await run_soak(connect=connect, proxy_pid=proc.pid, connections=args.connections,
                            workers=args.workers, duration=args.duration, sample_interval=args.sample_interval,
                            seed=args.seed, log=log)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, loopback only",
        "command": " ".join(["bench/soak.py", *sys.argv[1:]]),
        "setup": f"TemporaryCluster (max_connections {upstream_slots}, fsync off), `pgproxy serve` subprocess "
                 "(plaintext loopback listener, ES256 tokens, JSON-lines audit), asyncpg clients in one process",
    }
    text = report(result, meta)
    if proc.poll() is not None:
        text += f"\n**The proxy exited during the run (code {proc.returncode}).**\n"
    if stderr_tail:
        text += "\n## Last proxy log lines\n\n```\n" + "".join(stderr_tail[-20:]) + "```\n"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000, help="sessions held open (default 1000)")
    parser.add_argument("--workers", type=int, default=16, help="asyncpg clients running the mix (default 16)")
    parser.add_argument("--duration", type=float, default=180, help="workload seconds (default 180)")
    parser.add_argument("--sample-interval", type=float, default=10, help="seconds between samples (default 10)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    cleanup: list[Callable[[], None]] = []

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    with tempfile.TemporaryDirectory(prefix="pgproxy-soak-") as tmp:
        try:
            try:
                import uvloop
                runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
            except ImportError:
                runner = asyncio.Runner()
            with runner:
                text = runner.run(_main_async(args, Path(tmp), cleanup))
        finally:
            for fn in reversed(cleanup):
                try:
                    fn()
                except Exception as exc:
                    print(f"cleanup failed: {exc}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
