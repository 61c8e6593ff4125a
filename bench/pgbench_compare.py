#!/usr/bin/env python3
"""Compare pgbench through pgproxy with direct PostgreSQL and with pgbouncer (a benchmark, not a test).

What it does: starts a throwaway cluster (SCRAM) with a ``bench`` role and ``pgbench -i`` data, two
proxies (``pgproxy serve`` as subprocesses, JWT as the password, their own upstream credential):
"proxy" (bare: JSON-lines audit, no policy, no masking) and "proxy-full" (the signed audit log, the
shipped default policy plus an allow rule for the bench role, masking rules for a table pgbench does
not read), both with ``upstream.pool`` on (like for like with pgbouncer), and, when installed,
pgbouncer (session pooling) in front of the same cluster. It then runs
``pgbench -n -S`` per query mode (simple, extended, prepared), TPC-B (simple), one-client extended
(latency) and a connect-per-transaction run (``-C``) against each path, interleaved round-robin with
the order rotated every round, and reports median tps, added p50/p99 latency (from ``pgbench -l``
logs), tps ratios and the CPU time the proxies and pgbouncer spend per transaction (from
``/proc/<pid>/stat``).

Run: ``.venv/bin/python bench/pgbench_compare.py [--clients 8] [--duration 10] [--rounds 3]
[--scale 10] [--tls] [--modes ...] [--paths ...] [--out bench/results/latest.md]``. Everything (processes, temp dirs) is
cleaned up on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import glob
import importlib.util
import math
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
import yaml
from psycopg import sql

import pgproxy
from pgproxy.audit.keys import generate_key
from pgproxy.devdb import Database, TemporaryCluster, create_role
from pgproxy.identity import generate_dev_keys, mint_token
from pgproxy.tlsutil import DevTLS, generate_dev_ca_and_cert

REPO = Path(__file__).resolve().parent.parent
PGPROXY_BIN = Path(sys.executable).parent / "pgproxy"
BENCH_ROLE = "bench"
BENCH_DB = "bench"
ISSUER = "pgproxy-bench"
AUDIENCE = "pgproxy-bench"
PATHS = ("direct", "pgbouncer", "pump", "floor", "proxy", "proxy-full")
PROXY_PATHS = ("proxy", "proxy-full")
# Python reference middles (bench/python_floor.py), run only when --paths names them: a byte pump, and
# the pump plus framing and a hash-chained record per statement.
REFERENCE_PATHS = ("pump", "floor")
DEFAULT_PATHS = ("direct", "pgbouncer", *PROXY_PATHS)
FLOOR_SCRIPT = Path(__file__).resolve().parent / "python_floor.py"
QUERY_MODES = ("simple", "extended", "prepared")
TPCB = "tpcb"  # pgbench's default TPC-B-like script, simple protocol
LATENCY = "latency"  # -S, extended protocol, one client: added latency
CONNECT = "connect"  # label of the -C (new connection per transaction) runs
MODES = (*QUERY_MODES, TPCB, LATENCY, CONNECT)
DEFAULT_POLICY = Path(pgproxy.__file__).resolve().parent / "policy" / "default_policy.yaml"
# `pgproxy ARGS` under cProfile counting CPU time (not wall time, which on a busy machine mostly
# measures waiting for the CPU); the stats go to argv[1] when the proxy exits.
PROFILED_PROXY = """
import cProfile, sys, time
from pgproxy.cli import main
out = sys.argv.pop(1)
profiler = cProfile.Profile(time.process_time)
profiler.enable()
try:
    main(sys.argv[1:])
finally:
    profiler.disable()
    profiler.dump_stats(out)
"""
MASKED_TABLE = "bench_people"  # the "full" proxy's masking rules cover this table, not pgbench's
CONNECT_CLIENTS = 4
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------------------------------
# Small process helpers
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A currently free loopback TCP port (tiny race until the caller binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file ('' when unreadable)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (None when the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # [0] is field 3 (state), [11] utime, [12] stime


def cpu_ticks(pid: int) -> int | None:
    """utime + stime (clock ticks, all threads) of ``pid``, or None when it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[11]) + int(fields[12])


def tree_ticks(pid: int) -> int | None:
    """CPU ticks of ``pid`` including its reaped children and its live children (a postmaster's tree)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    total = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        total += cpu_ticks(int(child)) or 0
    return total


def machine_ticks() -> tuple[int, int, int, int]:
    """(process time, irq+softirq, steal, total) jiffies of all CPUs from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    v += [0] * (8 - len(v))
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return user + nice + system, irq + softirq, steal, sum(v)  # guest time is inside user/nice


def waited_children_ticks() -> int:
    """CPU ticks of our waited-for children (pgbench, psql) plus our own."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    seconds = children.ru_utime + children.ru_stime + me.ru_utime + me.ru_stime
    return round(seconds * CLK_TCK)


def process_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (command name, parent pid, utime + stime ticks) for every process we can read."""
    table: dict[int, tuple[str, int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry.name)] = (comm, int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def foreign_cpu(before: dict[int, tuple[str, int, int]], after: dict[int, tuple[str, int, int]],
                ours: set[int]) -> dict[str, int]:
    """CPU ticks used between two process tables by processes outside the trees rooted at ``ours``."""
    def is_ours(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid in ours:
                return True
            pid = after.get(pid, before.get(pid, ("", 0, 0)))[1]
            seen += 1
        return False

    usage: dict[str, int] = {}
    for pid, (comm, _ppid, ticks) in after.items():
        used = ticks - before[pid][2] if pid in before and before[pid][0] == comm else ticks
        if used > 0 and not is_ours(pid):
            usage[comm] = usage.get(comm, 0) + used
    return usage


@dataclass
class CpuSnapshot:
    """Cumulative CPU ticks at one moment: the machine, pgbench (+ us), the server tree, the middle man."""

    busy: int  # user + nice + system
    irq: int
    steal: int
    total: int
    client: int
    server: int | None
    middle: int | None

    @classmethod
    def take(cls, postmaster_pid: int | None, middle_pid: int | None) -> CpuSnapshot:
        return cls(*machine_ticks(), waited_children_ticks(),
                   tree_ticks(postmaster_pid) if postmaster_pid is not None else None,
                   cpu_ticks(middle_pid) if middle_pid is not None else None)


def wait_until_quiet(max_wait_s: float, busy_limit_pct: float = 20.0) -> float:
    """Wait (at most ``max_wait_s``) until the machine is mostly idle between runs; returns seconds waited.

    Nothing of ours runs between runs, so CPU use now is someone else's load (a shared machine).
    """
    started = time.monotonic()
    while True:
        b0, _, _, t0 = machine_ticks()
        time.sleep(0.5)
        b1, _, _, t1 = machine_ticks()
        busy = 100.0 * (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        waited = time.monotonic() - started
        if busy < busy_limit_pct or waited >= max_wait_s:
            return max(0.0, waited - 0.5)


def start_until_ready(command: list[str], log_file: Path, ready: str, what: str,
                      cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``command`` (output to ``log_file``) and wait until its log shows ``ready``."""
    with log_file.open("wb") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd,
                                start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready in tail(log_file, 200):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"{what} did not start (exit {proc.poll()}):\n{tail(log_file)}")


def take_size(path: Path) -> int:
    """The size of an append-only file (its writer appends with O_APPEND), which is then emptied."""
    with contextlib.suppress(OSError):
        size = path.stat().st_size
        os.truncate(path, 0)
        return size
    return 0


def stop_process(proc: subprocess.Popen[Any], *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal one process we started and wait for it, killing it if it does not exit in time."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout)


def run_as_postgres_prefix() -> tuple[list[str], int | None, int | None]:
    """(command prefix, uid, gid) for tools that refuse to run as root (pgbouncer)."""
    if os.geteuid() != 0:
        return [], None, None
    import pwd

    pw = pwd.getpwnam("postgres")
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", "postgres", "--"], pw.pw_uid, pw.pw_gid


def pg_env(port: int, password: str, sslmode: str) -> dict[str, str]:
    """Environment for psql/pgbench: the caller's PG* variables removed, ours set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": BENCH_ROLE, "PGPASSWORD": password,
                "PGDATABASE": BENCH_DB, "PGSSLMODE": sslmode, "PGGSSENCMODE": "disable",
                "PGCONNECT_TIMEOUT": "10"})
    return env


# --------------------------------------------------------------------------------------------------
# The three paths
# --------------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One way to reach the bench database; ``pid`` names the middle-man process to charge CPU to."""

    name: str
    port: int
    env: dict[str, str]
    pid: Callable[[], int | None] = lambda: None


class ProxyProcess:
    """``pgproxy serve -c FILE`` as a subprocess in front of ``db``: bare, or with every control on."""

    def __init__(self, workdir: Path, db: Database, password: str, tls: DevTLS | None, ttl_s: float, *,
                 full: bool = False, profile: Path | None = None) -> None:
        self.workdir = workdir
        self.full = full
        self.profile = profile
        self.port = free_port()
        keys = generate_dev_keys(workdir / "keys")
        password_file = workdir / "upstream-password"
        password_file.write_text(password)
        password_file.chmod(0o600)
        listener: dict[str, Any] = {"host": "127.0.0.1", "port": self.port}
        if tls is not None:
            listener["tls"] = {"cert_file": str(tls.cert_file), "key_file": str(tls.key_file)}
        else:
            listener["insecure_plaintext"] = True
        self.audit_file = workdir / "audit.jsonl"
        self.audit_dir = workdir / "audit"
        self._audit_size = 0
        config: dict[str, Any] = {
            "listeners": [listener],
            "identity": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["ES256"],
                         "jwks_file": str(keys.jwks_file)},
            "upstream": {"host": db.host, "port": db.port, "sslmode": "disable",
                         "credentials": [{"role": "*", "password_file": str(password_file)}],
                         "pool": {"enabled": True}},  # keeps server connections, as pgbouncer does
            "audit": {"jsonl_path": str(self.audit_file)},
        }
        if full:
            config.update(self.full_controls(workdir))
        self.config_file = workdir / "pgproxy.yaml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.token = mint_token(keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject="pgbench",
                                db_role=[BENCH_ROLE], ttl_seconds=ttl_s)
        self.log_file = workdir / "pgproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def full_controls(workdir: Path) -> dict[str, Any]:
        """Config sections of the "full" proxy: signed audit log, default policy + allow rule, masking
        (bench/session_overhead.py runs the same ones in process)."""
        signing_key = workdir / "audit-signing.key"
        generate_key(signing_key)
        policy = yaml.safe_load(DEFAULT_POLICY.read_text())
        policy["rules"].append({"name": "bench-allow", "match": {"roles": [BENCH_ROLE]}, "action": "allow"})
        policy_file = workdir / "policy.yaml"
        policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
        rules_dir = workdir / "masking"
        rules_dir.mkdir()
        (rules_dir / "people.yaml").write_text(yaml.safe_dump({"tables": {f"public.{MASKED_TABLE}": {
            "columns": {"email": "email", "ssn": {"mask": "partial", "keep_last": 4}}}}}))
        return {
            "audit": {"dir": str(workdir / "audit"), "signing_key_file": str(signing_key)},
            "policy": {"file": str(policy_file)},
            "masking": {"rules_dir": str(rules_dir), "schema_role": BENCH_ROLE, "schema_database": BENCH_DB},
        }

    def start(self) -> None:
        """Start and wait for the "listening" line."""
        command = [str(PGPROXY_BIN), "serve", "-c", str(self.config_file)]
        if self.profile is not None:  # written when the proxy exits (SIGINT at the end of the bench)
            command = [sys.executable, "-c", PROFILED_PROXY, str(self.profile), *command[1:]]
        self.proc = start_until_ready(command, self.log_file, "listening on ports", "pgproxy", cwd=self.workdir)

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def audit_bytes(self) -> int:
        """Audit bytes written since the last call (the JSON-lines file is emptied; the signed log grows)."""
        if not self.full:
            return take_size(self.audit_file)
        total = sum(f.stat().st_size for f in self.audit_dir.rglob("*") if f.is_file())
        written, self._audit_size = total - self._audit_size, total
        return written

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig=signal.SIGINT)


class ReferenceProcess:
    """bench/python_floor.py in front of ``db`` (``pump`` or ``floor``): pgbench logs in to the server
    through it with the bench role's password."""

    def __init__(self, mode: str, workdir: Path, db: Database) -> None:
        self.mode = mode
        self.db = db
        self.port = free_port()
        self.audit_file = workdir / "records"
        self.log_file = workdir / f"{mode}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, str(FLOOR_SCRIPT), self.mode, "--port", str(self.port),
                   "--upstream-host", self.db.host, "--upstream-port", str(self.db.port),
                   "--record-file", str(self.audit_file)]
        self.proc = start_until_ready(command, self.log_file, "listening", self.mode)

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def audit_bytes(self) -> int:
        """Record bytes written since the last call (the file is emptied)."""
        return take_size(self.audit_file)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig=signal.SIGINT)


class PgBouncerProcess:
    """pgbouncer in session mode in front of ``db`` (run as ``postgres`` when we are root)."""

    def __init__(self, binary: str, workdir: Path, db: Database, password: str, clients: int,
                 tls: DevTLS | None) -> None:
        self.binary = binary
        self.dir = workdir
        self.port = free_port()
        self.prefix, uid, gid = run_as_postgres_prefix()
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfile = workdir / "pgbouncer.pid"
        self.log_file = workdir / "pgbouncer.log"
        self.stdout_file = workdir / "pgbouncer.out"
        # The role's SCRAM verifier (not the password), as an auth_query would return it: clients are
        # checked against it and pgbouncer logs in to the server with the client's SCRAM keys.
        with psycopg.connect(db.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                               (BENCH_ROLE,)).fetchone()
        verifier = row[0] if row else None
        if not verifier or not str(verifier).startswith("SCRAM-SHA-256$"):
            verifier = password  # fall back to the plaintext password
        (workdir / "userlist.txt").write_text(f'"{BENCH_ROLE}" "{verifier}"\n')
        tls_lines = ""
        if tls is not None:
            shutil.copy(tls.cert_file, workdir / "server.crt")
            shutil.copy(tls.key_file, workdir / "server.key")
            tls_lines = (f"client_tls_sslmode = require\nclient_tls_cert_file = {workdir / 'server.crt'}\n"
                         f"client_tls_key_file = {workdir / 'server.key'}\n")
        pool = max(clients, CONNECT_CLIENTS) + 2
        (workdir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{BENCH_DB} = host={db.host} port={db.port} dbname={BENCH_DB}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {workdir / 'userlist.txt'}\n"
            f"pool_mode = session\ndefault_pool_size = {pool}\nmax_client_conn = 200\n"
            "server_tls_sslmode = disable\n"
            "log_connections = 0\nlog_disconnections = 0\nlog_pooler_errors = 1\n"
            f"logfile = {self.log_file}\npidfile = {self.pidfile}\n" + tls_lines)
        if uid is not None and gid is not None:
            for path in [workdir, *workdir.iterdir()]:
                os.chown(path, uid, gid)
            for path in workdir.iterdir():
                path.chmod(0o600)

    def start(self) -> None:
        """Start and wait until the port accepts connections."""
        with self.stdout_file.open("wb") as out:
            self.proc = subprocess.Popen([*self.prefix, self.binary, str(self.dir / "pgbouncer.ini")],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.dir,
                                         start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.pidfile.exists() and port_open(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not start (exit {self.proc.poll()}):\n"
                           f"{tail(self.stdout_file)}\n{tail(self.log_file)}")

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pidfile.read_text().strip())
        return None

    def stop(self) -> None:
        if self.proc is None:
            return
        pid = self.pid()
        if self.proc.poll() is None and pid is not None and pid != self.proc.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)  # the pgbouncer child of runuser
        stop_process(self.proc)


# --------------------------------------------------------------------------------------------------
# Running pgbench
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One pgbench run against one path."""

    path: str
    mode: str
    round: int
    tps: float = 0.0
    txns: int = 0
    failed: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    conn_ms: float | None = None
    cpu_us_per_txn: float | None = None  # the middle process (pgbouncer / proxy)
    client_us_per_txn: float | None = None  # pgbench
    server_us_per_txn: float | None = None  # all PostgreSQL processes
    machine_busy_pct: float | None = None
    other_load_pct: float | None = None  # machine CPU used by processes not part of the benchmark
    steal_pct: float | None = None  # CPU the hypervisor gave to other guests
    foreign: dict[str, float] = field(default_factory=dict)  # command -> % of the machine (top ones)
    waited_s: float = 0.0
    audit_bytes_per_txn: float | None = None
    returncode: int = 0
    problems: list[str] = field(default_factory=list)


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    index = max(0, math.ceil(q * len(sorted_values)) - 1)
    return float(sorted_values[index])


def parse_logs(log_dir: Path) -> tuple[list[int], int]:
    """Per-transaction latencies (µs) from pgbench ``-l`` files and the number of failed entries."""
    latencies: list[int] = []
    failed = 0
    for name in glob.glob(str(log_dir / "pgbench_log*")):
        with open(name) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                if parts[2].isdigit():
                    latencies.append(int(parts[2]))
                elif parts[2] != "skipped":
                    failed += 1
    latencies.sort()
    return latencies, failed


_NUM = r"([0-9]+(?:\.[0-9]+)?)"


def parse_summary(run: Run, stdout: str, stderr: str) -> None:
    """Fill tps / transactions / failures / connection time from pgbench's summary."""
    if m := re.search(rf"^tps = {_NUM}", stdout, re.M):
        run.tps = float(m.group(1))
    if m := re.search(r"number of transactions actually processed: (\d+)", stdout):
        run.txns = int(m.group(1))
    if m := re.search(r"number of failed transactions: (\d+)", stdout):
        run.failed = int(m.group(1))
    if m := re.search(rf"average connection time = {_NUM} ms", stdout):
        run.conn_ms = float(m.group(1))
    for line in stderr.splitlines():
        if any(w in line.lower() for w in ("error", "fatal", "abort", "could not", "server closed")):
            run.problems.append(line.strip())


def run_pgbench(endpoint: Endpoint, mode: str, round_no: int, args: argparse.Namespace, log_root: Path,
                postmaster_pid: int | None) -> Run:
    """One measured pgbench run (with per-transaction logs and CPU accounting)."""
    run = Run(endpoint.name, mode, round_no)
    log_dir = log_root / f"{endpoint.name}-{mode}-{round_no}"
    log_dir.mkdir()
    cmd = ["pgbench", "-n", "-T", str(args.duration)] + ([] if mode == TPCB else ["-S"])
    if mode == CONNECT:
        # No latency log: pgbench connects synchronously, so under -C one client's connection set-up
        # stalls the other clients of its thread and their per-transaction times mean little.
        cmd += ["-C", "-j", "2", "-c", str(CONNECT_CLIENTS), "-M", "simple"]
    else:
        clients = 1 if mode == LATENCY else args.clients
        protocol = {TPCB: "simple", LATENCY: "extended"}.get(mode, mode)
        cmd += ["-j", str(min(2, clients)), "-c", str(clients), "-M", protocol, "-l", "--log-prefix",
                str(log_dir / "pgbench_log")]
        if args.sampling_rate < 1.0:
            cmd += ["--sampling-rate", str(args.sampling_rate)]
    run.waited_s = wait_until_quiet(args.quiet_wait)
    pid = endpoint.pid()
    ours = {os.getpid(), *(x for x in (postmaster_pid, pid) if x is not None)}
    table_before = process_table()
    before = CpuSnapshot.take(postmaster_pid, pid)
    proc = subprocess.Popen(cmd, env=endpoint.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=log_dir)
    try:
        stdout, stderr = proc.communicate(timeout=args.duration + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        run.problems.append(f"pgbench hung: killed after {args.duration + 60} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.3)  # let the server reap the backends pgbench just closed
    after = CpuSnapshot.take(postmaster_pid, pid)
    usage = foreign_cpu(table_before, process_table(), ours)
    if after.total > before.total:
        top = sorted(usage.items(), key=lambda kv: -kv[1])[:3]
        run.foreign = {comm: 100.0 * t / (after.total - before.total) for comm, t in top}
    run.returncode = proc.returncode
    parse_summary(run, stdout, stderr)
    if proc.returncode != 0:
        run.problems.append(f"pgbench exit status {proc.returncode}")
    if pid is not None and after.middle is None:
        run.problems.append(f"{endpoint.name} process {pid} disappeared during the run")
    account_cpu(run, before, after)
    latencies, failed_logged = parse_logs(log_dir)
    if latencies:
        run.p50_ms = percentile(latencies, 0.50) / 1000
        run.p99_ms = percentile(latencies, 0.99) / 1000
    run.failed = max(run.failed, failed_logged)
    shutil.rmtree(log_dir, ignore_errors=True)
    return run


def account_cpu(run: Run, before: CpuSnapshot, after: CpuSnapshot) -> None:
    """Per-transaction CPU of pgbench, the server and the middle process; other processes' share."""
    def per_txn(a: int | None, b: int | None) -> float | None:
        return (b - a) * 1e6 / CLK_TCK / run.txns if a is not None and b is not None and run.txns else None

    run.client_us_per_txn = per_txn(before.client, after.client)
    run.server_us_per_txn = per_txn(before.server, after.server)
    run.cpu_us_per_txn = per_txn(before.middle, after.middle)
    total = after.total - before.total
    if total <= 0:
        return
    busy = after.busy - before.busy
    run.machine_busy_pct = 100.0 * (busy + after.irq - before.irq) / total
    run.steal_pct = 100.0 * (after.steal - before.steal) / total
    ours = (after.client - before.client) + sum(
        b - a for a, b in ((before.server, after.server), (before.middle, after.middle))
        if a is not None and b is not None)
    run.other_load_pct = max(0.0, 100.0 * (busy - ours) / total)


def check_endpoint(endpoint: Endpoint) -> None:
    """Fail early when a path cannot run a query as the bench role."""
    proc = subprocess.run(["psql", "-XAtc", "SELECT current_user, count(*) FROM pgbench_branches"],
                          env=endpoint.env, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0 or not proc.stdout.startswith(f"{BENCH_ROLE}|"):
        raise RuntimeError(f"{endpoint.name}: sanity query failed: "
                           f"{proc.stdout.strip()} {proc.stderr.strip()}")


def warm_up(endpoint: Endpoint, seconds: int) -> None:
    """A short unrecorded run so caches and pools are warm before round 1."""
    if seconds > 0:
        subprocess.run(["pgbench", "-n", "-S", "-c", "2", "-j", "2", "-T", str(seconds)], env=endpoint.env,
                       capture_output=True, timeout=seconds + 60, check=False)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def added(value: float | None, base: float | None) -> str:
    return "-" if value is None or base is None else f"{value - base:+.3f}"


def command_version(cmd: Sequence[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout
        return out.splitlines()[0].strip() if out else "?"
    return "?"


def source_revision() -> str:
    """The git commit of the proxy code measured, flagged when pgproxy/ has uncommitted changes."""
    checkout = Path(pgproxy.__file__).resolve().parent.parent  # may differ from this script's (PYTHONPATH)

    def git(*argv: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["git", "-C", str(checkout), *argv], capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()
        return ""

    commit = git("rev-parse", "--short", "HEAD")  # of the checkout the measured pgproxy comes from
    if not commit:
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes in pgproxy/" if git("status", "--porcelain", "--", "pgproxy") else "")


def machine_facts(pgbouncer_bin: str | None, server_version: str) -> list[tuple[str, str]]:
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return [
        ("pgproxy revision", source_revision()),
        ("nproc", str(len(os.sched_getaffinity(0)))),
        ("CPU", cpu_model),
        ("kernel", platform.release()),
        ("python (proxy)", platform.python_version()),
        ("uvloop", "yes" if importlib.util.find_spec("uvloop") else "no"),
        ("PostgreSQL", server_version),
        ("pgbench", command_version(["pgbench", "--version"])),
        ("pgbouncer", command_version([pgbouncer_bin, "--version"]) if pgbouncer_bin else "not installed"),
    ]


MODE_LABELS = {
    "simple": "-S -c CLIENTS, simple", "extended": "-S -c CLIENTS, extended", "prepared": "-S -c CLIENTS, prepared",
    TPCB: "TPC-B -c CLIENTS, simple", LATENCY: "-S -c 1, extended (latency)",
    CONNECT: f"-S -C -c {CONNECT_CLIENTS} (connect per txn)",
}


def build_report(runs: list[Run], args: argparse.Namespace, facts: list[tuple[str, str]],
                 paths: Sequence[str], notes: list[str], elapsed_s: float) -> str:
    """The Markdown report."""
    by: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        by.setdefault((r.mode, r.path), []).append(r)

    def med(mode: str, path: str, attr: str) -> float | None:
        return median([getattr(r, attr) for r in by.get((mode, path), [])])

    def label(mode: str) -> str:
        return MODE_LABELS[mode].replace("CLIENTS", str(args.clients))

    cols = [x for x in PATHS if x in paths]
    base = "pgbouncer" if "pgbouncer" in cols else "direct"
    proxies = [x for x in cols if x in PROXY_PATHS or x in REFERENCE_PATHS]
    modes = [m for m in MODES if m in args.modes]
    out: list[str] = []
    w = out.append
    w("# pgbench: direct vs pgbouncer vs pgproxy (bare and full)\n")
    started = dt.datetime.now().astimezone() - dt.timedelta(seconds=elapsed_s)
    w(f"Run started {started:%Y-%m-%d %H:%M %Z}, took {elapsed_s / 60:.1f} min. "
      f"`pgbench -n -T {args.duration}` ({', '.join(label(m) for m in modes)}), scale {args.scale}, "
      f"{args.rounds} interleaved rounds (path order rotated each round), medians shown. "
      f"Client TLS: {'on (sslmode=require on every path)' if args.tls else 'off'}; the inner hops "
      "(proxy→server, pgbouncer→server) are plaintext loopback. Command: "
      f"`{' '.join(['bench/pgbench_compare.py', *args.argv])}`.\n")
    w("| machine | |\n|---|---|")
    for key, value in facts:
        w(f"| {key} | {value} |")
    w("")

    w(f"## Summary (tps / {base} tps, same run; CPU of the middle process per transaction)\n")
    w(f"| workload | {base} | " + " | ".join(proxies) + " | "
      + " | ".join(f"{x} CPU µs/txn" for x in proxies) + f" | {base} CPU µs/txn |")
    w("|---|" + "---:|" * (2 + 2 * len(proxies)))
    for mode in modes:
        b = med(mode, base, "tps")
        cells = ["1.00" if b else "-"] + [ratio(med(mode, x, "tps"), b) for x in proxies]
        cells += [fmt(med(mode, x, "cpu_us_per_txn"), ".0f") for x in [*proxies, base]]
        w(f"| {label(mode)} | " + " | ".join(cells) + " |")
    if LATENCY in modes:
        b50 = med(LATENCY, base, "p50_ms")
        w("\nAdded p50 latency over " + base + " with one client (extended): "
          + ", ".join(f"{x} {added(med(LATENCY, x, 'p50_ms'), b50)} ms" for x in proxies) + ".")
    w("")

    w("## Throughput (median tps)\n")
    w("| mode | " + " | ".join(cols) + " | " + " | ".join(f"{x}/{base}" for x in cols if x != base) + " |")
    w("|---|" + "---:|" * (2 * len(cols) - 1))
    for mode in modes:
        tps = {x: med(mode, x, "tps") for x in cols}
        w(f"| {label(mode)} | " + " | ".join(fmt(tps[x]) for x in cols) + " | "
          + " | ".join(ratio(tps[x], tps[base]) for x in cols if x != base) + " |")
    w("")

    w("## Latency per transaction (median over rounds of each run's p50 / p99, ms)\n")
    w("| mode | " + " | ".join(f"{x} p50 / p99" for x in cols) + " | "
      + " | ".join(f"added by {x} p50 / p99" for x in cols if x != "direct") + " |")
    w("|---|" + "---:|" * (2 * len(cols) - 1))
    for mode in (m for m in modes if m != CONNECT):
        d50, d99 = med(mode, "direct", "p50_ms"), med(mode, "direct", "p99_ms")
        cells = [f"{fmt(med(mode, x, 'p50_ms'), '.3f')} / {fmt(med(mode, x, 'p99_ms'), '.3f')}" for x in cols]
        cells += [f"{added(med(mode, x, 'p50_ms'), d50)} / {added(med(mode, x, 'p99_ms'), d99)}"
                  for x in cols if x != "direct"]
        w(f"| {label(mode)} | " + " | ".join(cells) + " |")
    w("")
    if CONNECT in modes:
        conn = [f"{x} {fmt(med(CONNECT, x, 'conn_ms'), '.3f')} ms" for x in cols]
        w(f"Average connection time in the `-C` runs (pgbench's own figure): {', '.join(conn)}.\n")

    w("## CPU per transaction (µs of user+system CPU, median over rounds)\n")
    middles = [x for x in cols if x != "direct"]
    w("The middle process alone (pgbouncer, proxies), from `/proc/<pid>/stat` before/after each run:\n")
    w("| mode | " + " | ".join(f"{x} µs/txn" for x in middles) + " | "
      + " | ".join(f"{x} audit bytes/txn" for x in proxies) + " |")
    w("|---|" + "---:|" * (len(middles) + len(proxies)))
    for mode in modes:
        cells = [fmt(med(mode, x, "cpu_us_per_txn"), ".1f") for x in middles]
        cells += [fmt(med(mode, x, "audit_bytes_per_txn"), ".0f") for x in proxies]
        w(f"| {mode} | " + " | ".join(cells) + " |")
    w("")
    w("Where the machine's CPU went (pgbench = the load generator incl. this script; postgres = every "
      "server process; other = processes not part of the benchmark; steal = taken by the hypervisor):\n")
    w("| mode | path | pgbench µs/txn | postgres µs/txn | middle µs/txn | machine busy % | other % | steal % |")
    w("|---|---|---:|---:|---:|---:|---:|---:|")
    for mode in modes:
        for path in cols:
            w(f"| {mode} | {path} | {fmt(med(mode, path, 'client_us_per_txn'), '.1f')} | "
              f"{fmt(med(mode, path, 'server_us_per_txn'), '.1f')} | "
              f"{fmt(med(mode, path, 'cpu_us_per_txn'), '.1f')} | "
              f"{fmt(med(mode, path, 'machine_busy_pct'), '.0f')} | "
              f"{fmt(med(mode, path, 'other_load_pct'), '.0f')} | {fmt(med(mode, path, 'steal_pct'), '.0f')} |")
    w("")

    w("## Every run (tps; spread = (max - min) / median; other = max CPU % of foreign processes)\n")
    rounds = " | ".join(f"round {i + 1}" for i in range(args.rounds))
    w(f"| mode | path | {rounds} | spread | other % max | failed txns |")
    w("|---|---|" + "---:|" * (args.rounds + 3))
    for mode in modes:
        for path in cols:
            rs = sorted(by.get((mode, path), []), key=lambda r: r.round)
            run_tps = [r.tps for r in rs]
            spread = (max(run_tps) - min(run_tps)) / statistics.median(run_tps) * 100 \
                if run_tps and min(run_tps) > 0 else None
            other = max((r.other_load_pct for r in rs if r.other_load_pct is not None), default=None)
            per_round = " | ".join(f"{t:.0f}" for t in run_tps)
            w(f"| {mode} | {path} | {per_round} | {fmt(spread, '.1f', '%')} | {fmt(other, '.0f')} | "
              f"{sum(r.failed for r in rs)} |")
    w("")
    noisy = [r for r in runs if (r.other_load_pct or 0) >= 5]
    if noisy:
        w(f"Runs with >= 5% of the machine used by foreign processes ({len(noisy)} of {len(runs)}):\n")
        for r in noisy:
            top = ", ".join(f"{c} {v:.0f}%" for c, v in r.foreign.items() if v >= 0.5) or "not attributable"
            w(f"- {r.mode}/{r.path}/round {r.round + 1}: other {r.other_load_pct:.0f}% ({top})")
        w("")
    waited = sum(r.waited_s for r in runs)
    if waited >= 1:
        notes = [*notes, f"Waited {waited:.0f} s in total for foreign load to drop before runs (--quiet-wait)."]

    problems = [f"{r.mode}/{r.path}/round {r.round + 1}: {p}" for r in runs for p in r.problems]
    w("## Notes\n")
    for note in notes:
        w(f"- {note}")
    if problems:
        w(f"- **Problems reported by pgbench ({len(problems)})**, first 20:")
        for problem in problems[:20]:
            w(f"  - `{problem}`")
    failed = sum(r.failed for r in runs)
    if failed:
        w(f"- **{failed} failed transaction(s)** in total (see the per-run table).")
    if not problems and not failed:
        w("- No pgbench errors, aborted clients or failed transactions on any path.")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=8, help="pgbench clients for the -S runs (default 8)")
    p.add_argument("--duration", type=int, default=10, help="seconds per pgbench run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per mode and path (default 3)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor (default 10)")
    p.add_argument("--tls", action="store_true", help="TLS between pgbench and every path (sslmode=require)")
    p.add_argument("--warmup", type=int, default=3, help="unrecorded warm-up seconds per path (default 3)")
    p.add_argument("--sampling-rate", type=float, default=1.0,
                   help="fraction of transactions written to the latency logs (default 1.0)")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="before each run, wait up to this many seconds for other load on the machine to "
                        "drop below 20%% (default 30; 0 disables)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                   help=f"comma-separated subset of {','.join(PATHS)} (default {','.join(DEFAULT_PATHS)}; "
                        "pump and floor are Python reference middles: bench/python_floor.py)")
    p.add_argument("--profile-dir", type=Path, default=None,
                   help="run each proxy under cProfile and write DIR/<path>.prof when it exits "
                        "(slows the proxies: for finding costs, not for the ratios)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.md",
                   help="Markdown report file (default bench/results/latest.md)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown or not args.modes:
        p.error(f"--modes: unknown mode(s) {sorted(unknown)}")
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if set(args.paths) - set(PATHS) or "direct" not in args.paths or not set(args.paths) - {"direct", "pgbouncer"}:
        p.error(f"--paths: a subset of {','.join(PATHS)} with direct and at least one other middle")
    if min(args.clients, args.duration, args.rounds, args.scale) < 1 or not 0 < args.sampling_rate <= 1:
        p.error("--clients, --duration, --rounds and --scale must be >= 1; --sampling-rate in (0, 1]")
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Bench:
    """Everything set up for the measurements."""

    endpoints: list[Endpoint]
    proxies: dict[str, ProxyProcess | ReferenceProcess]
    postmaster_pid: int | None
    server_version: str
    pgbouncer_bin: str | None
    notes: list[str]


def start_bench_database(stack: contextlib.ExitStack, *,
                         tls: bool = False) -> tuple[TemporaryCluster, Database, str, str]:
    """A throwaway SCRAM cluster with the bench role owning the bench database (stopped by ``stack``).

    Returns the cluster, its database, the bench role's password and the server version.
    """
    log("starting a temporary PostgreSQL cluster ...")
    cluster = TemporaryCluster(auth_method="scram-sha-256", ssl=tls)
    stack.callback(cluster.stop)
    db = cluster.start()
    password = secrets.token_urlsafe(18)
    create_role(db, BENCH_ROLE, password)
    with psycopg.connect(db.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(BENCH_DB),
                                                                  sql.Identifier(BENCH_ROLE)))
        row = conn.execute("SHOW server_version").fetchone()
    return cluster, db, password, str(row[0]) if row else "?"


def set_up(args: argparse.Namespace, stack: contextlib.ExitStack) -> Bench:
    """Cluster, data, proxy and (when installed) pgbouncer; their clean-up is registered on ``stack``."""
    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="pgproxy-bench-"))
    stack.callback(shutil.rmtree, workdir, True)
    sslmode = "require" if args.tls else "disable"

    cluster, db, password, server_version = start_bench_database(stack, tls=args.tls)
    direct = Endpoint("direct", db.port, pg_env(db.port, password, sslmode))
    log(f"pgbench -i -s {args.scale} ...")
    subprocess.run(["pgbench", "-i", "-q", "-s", str(args.scale)], env=direct.env, check=True,
                   capture_output=True, timeout=1800)
    endpoints = [direct]

    tls = generate_dev_ca_and_cert(workdir / "tls") if args.tls else None
    ttl = 2 * args.rounds * len(args.modes) * len(PATHS) * (args.duration + 5) + 3600
    if "proxy-full" in args.paths:
        with psycopg.connect(db.dsn(database=BENCH_DB), autocommit=True) as conn:  # owned by the superuser
            conn.execute(f"CREATE TABLE {MASKED_TABLE} (id int PRIMARY KEY, email text, ssn text)")
            conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(MASKED_TABLE),
                                                                   sql.Identifier(BENCH_ROLE)))
    proxies: dict[str, ProxyProcess | ReferenceProcess] = {}
    if args.profile_dir is not None:
        args.profile_dir = args.profile_dir.resolve()
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    for name in (p for p in PROXY_PATHS if p in args.paths):
        proxy_dir = workdir / name
        proxy_dir.mkdir()
        profile = args.profile_dir / f"{name}.prof" if args.profile_dir is not None else None
        proxy = ProxyProcess(proxy_dir, db, password, tls, ttl, full=name == "proxy-full", profile=profile)
        stack.callback(proxy.stop)
        stack.push(lambda exc_type, exc, tb, f=proxy.log_file: _show_log_on_error(exc_type, f))
        log(f"starting pgproxy ({name}) ...")
        proxy.start()
        proxies[name] = proxy

    pgbouncer_bin = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None)
    if "pgbouncer" not in args.paths:
        pgbouncer_bin = None
    elif pgbouncer_bin is None:
        notes.append("pgbouncer is not installed: its column is skipped "
                     "(`apt-get install pgbouncer` to include it).")
    else:
        # its own temp dir: pgbouncer may run as 'postgres', which cannot enter our 0700 workdir
        bouncer_dir = Path(tempfile.mkdtemp(prefix="pgproxy-bench-pgbouncer-"))
        stack.callback(shutil.rmtree, bouncer_dir, True)
        bouncer = PgBouncerProcess(pgbouncer_bin, bouncer_dir, db, password, args.clients, tls)
        stack.callback(bouncer.stop)
        log("starting pgbouncer ...")
        bouncer.start()
        endpoints.append(Endpoint("pgbouncer", bouncer.port, pg_env(bouncer.port, password, sslmode),
                                  bouncer.pid))
    for name in (p for p in REFERENCE_PATHS if p in args.paths):
        if args.tls:
            raise RuntimeError(f"--tls: the {name} path speaks no TLS")
        reference_dir = workdir / name
        reference_dir.mkdir()
        reference = ReferenceProcess(name, reference_dir, db)
        stack.callback(reference.stop)
        log(f"starting {name} ...")
        reference.start()
        proxies[name] = reference
    endpoints += [Endpoint(name, p.port, pg_env(p.port, p.token if isinstance(p, ProxyProcess) else password,
                                                sslmode), p.pid)
                  for name, p in proxies.items()]
    endpoints = [ep for ep in endpoints if ep.name in args.paths]
    try:
        postmaster_pid: int | None = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        postmaster_pid = None
        notes.append("postmaster.pid unreadable: no server CPU figures.")
    return Bench(endpoints, proxies, postmaster_pid, server_version, pgbouncer_bin, notes)


def _show_log_on_error(exc_type: type[BaseException] | None, log_file: Path) -> bool:
    """ExitStack hook: print the proxy log's tail when the benchmark fails (before it is deleted)."""
    if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
        log(f"--- {log_file.name} (tail) ---\n{tail(log_file, 40)}")
    return False


def proxy_log_note(name: str, proxy: ProxyProcess | ReferenceProcess) -> str:
    """A note on the WARNING/ERROR lines of the proxy log."""
    try:
        lines = proxy.log_file.read_text(errors="replace").splitlines()
    except OSError:
        return f"{name} log: unreadable."
    bad = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
    if bad:
        return f"{name} log: {len(bad)} warning/error line(s), first: `{bad[0][:300]}`"
    return f"{name} log: no warnings or errors."


def measure(args: argparse.Namespace, bench: Bench) -> list[Run]:
    """All rounds: modes in order, paths round-robin with the order rotated every round."""
    endpoints = bench.endpoints
    for ep in endpoints:
        check_endpoint(ep)
        warm_up(ep, args.warmup)
    for proxy in bench.proxies.values():
        proxy.audit_bytes()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="pgproxy-bench-logs-") as tmp:
        total = args.rounds * len(args.modes) * len(endpoints)
        for round_no in range(args.rounds):
            shift = round_no % len(endpoints)
            order = endpoints[shift:] + endpoints[:shift]
            for mode in args.modes:
                for ep in order:
                    log(f"[{len(runs) + 1}/{total}] round {round_no + 1} {mode:<8} {ep.name:<9} ...")
                    run = run_pgbench(ep, mode, round_no, args, Path(tmp), bench.postmaster_pid)
                    if ep.name in bench.proxies:
                        size = bench.proxies[ep.name].audit_bytes()
                        run.audit_bytes_per_txn = size / run.txns if run.txns else None
                    runs.append(run)
                    problems = f"  PROBLEMS: {run.problems[:3]}" if run.problems else ""
                    log(f"    tps {run.tps:9.1f}  p50 {fmt(run.p50_ms, '.3f')} ms  "
                        f"p99 {fmt(run.p99_ms, '.3f')} ms  cpu {fmt(run.cpu_us_per_txn, '.1f')} µs/txn  "
                        f"pg {fmt(run.server_us_per_txn, '.0f')}  other {fmt(run.other_load_pct, '.0f')}%  "
                        f"failed {run.failed}{problems}")
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: it may be ignored when backgrounded
        signal.signal(sig, _raise_interrupt)
    if shutil.which("pgbench") is None:
        log("pgbench not found on PATH (Debian: apt-get install postgresql-client)")
        return 2
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:  # stops every process and removes every temp dir
            bench = set_up(args, stack)
            runs = measure(args, bench)
            notes = [*bench.notes, *(proxy_log_note(n, p) for n, p in bench.proxies.items()),
                     *static_notes(args)]
            facts = machine_facts(bench.pgbouncer_bin, bench.server_version)
            report = build_report(runs, args, facts, [e.name for e in bench.endpoints], notes,
                                  time.monotonic() - started)
    except KeyboardInterrupt:
        log("interrupted; everything was stopped and removed")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError, psycopg.Error) as exc:
        log(f"benchmark failed: {exc}\n{getattr(exc, 'stderr', '') or ''}")
        return 1
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    log(f"report written to {args.out}")
    return 0


def static_notes(args: argparse.Namespace) -> list[str]:
    """How to read the numbers."""
    references = [
        "pump and floor are Python reference middles, not pgproxy (bench/python_floor.py, uvloop, no pool: "
        "a new server connection per client, pgbench logs in to the server through them): pump copies "
        "bytes; floor also reads every message header and writes a hash-chained JSON record per statement "
        "(SQL, parameters, rows, row digest, tag) with no identity, policy, masking or protocol state: "
        "the least Python work a per-statement log needs."
    ] if set(args.paths) & set(REFERENCE_PATHS) else []
    return [
        *references,
        f"All processes share {len(os.sched_getaffinity(0))} CPU(s): pgbench, the PostgreSQL backends and "
        "the proxy/pgbouncer compete for them, so a middle process's CPU per transaction directly lowers "
        "tps. Ratios are the meaningful output; absolute tps depend on the machine.",
        "proxy (bare) writes a JSON-lines audit event per statement (the file is truncated after every "
        "run); proxy-full writes the signed, hash-chained audit log (Ed25519 checkpoints) with result "
        "capture, runs the shipped default policy plus an allow rule for the bench role and has masking "
        f"rules for `{MASKED_TABLE}` (not read by pgbench). Audit bytes per transaction are shown above.",
        "`connect` runs (`-C`): every transaction opens a new connection. Direct = client SCRAM with the "
        "server; pgbouncer = client SCRAM with pgbouncer, server connections are reused from its pool "
        "(DISCARD ALL between clients); proxy = the token as a cleartext password (its ES256 check cached "
        "until exp) + an upstream connection from the proxy's pool (`upstream.pool.enabled: true` on both "
        "proxies, like for like with pgbouncer: DISCARD ALL between clients, the proxy's own SCRAM login "
        "only when no idle connection fits). The clients' side differs: with SCRAM (direct, pgbouncer) "
        "pgbench derives a PBKDF2 key per connection, with a token it derives none (pgbench µs/txn above).",
        "pgbouncer checks clients against the role's SCRAM verifier (as an auth_query would return it) and "
        "logs in to the server with the client's SCRAM keys; pool_mode=session.",
        "p50/p99 come from `pgbench -l` per-transaction logs (every transaction of every run; the median "
        "over rounds is shown). `-C` runs have no latency percentiles: pgbench connects synchronously, so "
        "one client's connection set-up stalls the other clients of its thread; pgbench's average "
        "connection time is shown instead.",
    ]


if __name__ == "__main__":
    sys.exit(main())
