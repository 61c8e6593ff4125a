"""Requests per second straight to an HTTP upstream versus through pgproxy's HTTP proxy, in one run.

The upstream (a small aiohttp app) and the proxy (`pgproxy serve`, JSON-lines audit, bearer credential
injected, the JWT checked on every request (a verified token is reused for up to 30 s, as in production),
one mask rule) run as separate processes; the client is an aiohttp session with N concurrent workers,
the same code and settings for both paths. Each round runs every scenario on both paths, alternating
which goes first; the report gives the median over rounds, the proxy/direct ratios and the CPU time
per request of each process (which shows whether the proxy, not the client or upstream, is the
bottleneck of the proxied path). A benchmark, not a test: it never fails on slow numbers. Run:

    .venv/bin/python bench/http_compare.py [--workers 16] [--duration 5] [--rounds 3] [--out bench/results/http.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from pgproxy.identity import generate_dev_keys, mint_token

ROOT = Path(__file__).resolve().parent.parent
ISSUER, AUDIENCE = "https://issuer.bench", "pgproxy-bench"
SMALL = {"customer": {"id": 42, "name": "Ann", "email": "ann@example.com"}, "items": [{"sku": "A1", "qty": 2}]}
BLOB = os.urandom(1024 * 1024)
POST_BODY = {"query": "x" * 900}


def upstream_app() -> web.Application:
    async def small(request: web.Request) -> web.Response:
        return web.json_response(SMALL)

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/json")

    async def blob(request: web.Request) -> web.Response:
        return web.Response(body=BLOB, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_post("/echo", echo)
    app.router.add_get("/blob", blob)
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


SCENARIOS: dict[str, tuple[str, str, Callable[[], dict[str, Any]]]] = {
    "GET small JSON (masked)": ("GET", "/small", dict),
    "POST 1 KiB JSON": ("POST", "/echo", lambda: {"json": POST_BODY}),
    "GET 1 MiB body": ("GET", "/blob", dict),
}


async def load(url: str, method: str, kwargs: dict[str, Any], headers: dict[str, str], workers: int,
               duration: float) -> tuple[float, list[float], int]:
    """(requests/s, latencies in ms, errors) with ``workers`` concurrent clients for ``duration`` s."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop = time.monotonic() + duration

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop:
                t = time.perf_counter()
                async with session.request(method, url, headers=headers, **kwargs) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append((time.perf_counter() - t) * 1000)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.monotonic() - started
    return len(latencies) / elapsed, latencies, errors


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


Outcome = tuple[float, list[float], int]  # per second, latencies in ms, errors


def measure(scenarios: list[str], paths: list[str], rounds: int, processes: dict[str, int],
            once: Callable[[str, str], Outcome], unit: str) -> tuple[dict[tuple[str, str], list[Outcome]],
                                                                     dict[tuple[str, str, str], list[float]]]:
    """Run every scenario on every path each round (alternating which path goes first): the outcomes, and
    the CPU seconds per request of this process ("client") and of ``processes`` (name -> pid)."""
    results: dict[tuple[str, str], list[Outcome]] = {}
    cpu: dict[tuple[str, str, str], list[float]] = {}  # (scenario, path, process) -> CPU s per request
    for round_ in range(rounds):
        for name in scenarios:
            for which in paths if round_ % 2 == 0 else list(reversed(paths)):
                before = {"client": time.process_time(), **{p: cpu_seconds(pid) for p, pid in processes.items()}}
                outcome = once(name, which)
                after = {"client": time.process_time(), **{p: cpu_seconds(pid) for p, pid in processes.items()}}
                results.setdefault((name, which), []).append(outcome)
                for proc_name in before:
                    cpu.setdefault((name, which, proc_name), []).append(
                        (after[proc_name] - before[proc_name]) / max(1, len(outcome[1])))
                print(f"round {round_ + 1} {name:34} {which:6} {outcome[0]:9.0f} {unit}", file=sys.stderr)
    return results, cpu


def ratio_tables(scenarios: list[str], results: dict[tuple[str, str], list[Outcome]],
                 cpu: dict[tuple[str, str, str], list[float]], rate: str, per: str, noun: str) -> list[str]:
    """The report's two tables: ``rate`` (req/s), ratio and latency per scenario, then CPU time ``per`` unit
    (req) of work (``noun``: request)."""
    lines = [
        f"| Scenario | direct {rate} | proxy {rate} | proxy/direct | direct p50 / p99 ms | proxy p50 / p99 ms "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in scenarios:
        d, p = results[(name, "direct")], results[(name, "proxy")]
        d_rps, p_rps = statistics.median(r[0] for r in d), statistics.median(r[0] for r in p)
        d_lat = [x for r in d for x in r[1]]
        p_lat = [x for r in p for x in r[1]]
        errors = sum(r[2] for r in d) + sum(r[2] for r in p)
        lines.append(f"| {name} | {d_rps:,.0f} | {p_rps:,.0f} | {p_rps / d_rps:.2f} | "
                     f"{pct(d_lat, 50):.2f} / {pct(d_lat, 99):.2f} | {pct(p_lat, 50):.2f} / {pct(p_lat, 99):.2f} | "
                     f"{errors} |")
    lines += ["", "The machine is shared (2 cores for client, proxy and upstream together), so absolute numbers "
              f"move between runs; the ratio is the figure to compare. CPU time per {noun} of each process "
              "(median over rounds, from /proc) shows which one is the bottleneck:",
              "", f"| Scenario | path | client µs/{per} | upstream µs/{per} | proxy µs/{per} |",
              "|---|---|---:|---:|---:|"]
    for name in scenarios:
        for which in ("direct", "proxy"):
            per = [statistics.median(cpu[(name, which, p)]) * 1e6 for p in ("client", "upstream", "proxy")]
            shown = [f"{v:,.0f}" for v in per[:2]] + [f"{per[2]:,.0f}" if which == "proxy" else "—"]
            lines.append(f"| {name} | {which} | " + " | ".join(shown) + " |")
    lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "http.md")
    ap.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_upstream:
        web.run_app(upstream_app(), host="127.0.0.1", port=args.serve_upstream, access_log=None, print=None)
        return
    with tempfile.TemporaryDirectory(prefix="pgproxy-http-bench-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    keys = generate_dev_keys(tmp / "keys")
    up_port, http_port = free_port(), free_port()
    config = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["ES256"],
                     "jwks_file": str(keys.jwks_file), "default_db_role": "bench"},
        "upstream": {"credentials": [{"role": "*"}]},
        "audit": {"jsonl_path": str(tmp / "audit.jsonl")},
        "http": {"listen": {"host": "127.0.0.1", "port": http_port, "insecure_plaintext": True},
                 "targets": [{"name": "api", "upstream": f"http://127.0.0.1:{up_port}",
                              "credential": {"kind": "bearer", "value_env": "BENCH_UPSTREAM_KEY"},
                              "masks": [{"paths": ["$.customer.email"]}]}],
                 "default": "allow"},
    }
    (tmp / "pgproxy.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "BENCH_UPSTREAM_KEY": "bench-upstream-secret-0123456789"}
    upstream = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(up_port)])
    proxy = subprocess.Popen([sys.executable, "-m", "pgproxy", "--log-level", "WARNING", "serve", "-c",
                              str(tmp / "pgproxy.yaml")], env=env)
    try:
        wait_port(up_port, upstream)
        wait_port(http_port, proxy)
        token = mint_token(keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject="bench",
                           ttl_seconds=3600)
        paths = {"direct": (f"http://127.0.0.1:{up_port}", {}),
                 "proxy": (f"http://127.0.0.1:{http_port}/api", {"Authorization": f"Bearer {token}"})}

        def once(name: str, which: str) -> Outcome:
            method, path, kwargs = SCENARIOS[name]
            base, headers = paths[which]
            return asyncio.run(load(base + path, method, kwargs(), headers, args.workers, args.duration))

        results, cpu = measure(list(SCENARIOS), list(paths), args.rounds,
                               {"upstream": upstream.pid, "proxy": proxy.pid}, once, "req/s")
        report = format_report(args, results, cpu)
    finally:
        for proc in (proxy, upstream):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


def revision() -> str:
    """The commit measured, and whether pgproxy/ had uncommitted changes."""
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    if rev and subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "pgproxy"], cwd=ROOT).returncode:
        rev = rev.strip() + " with uncommitted changes to pgproxy/"
    return rev.strip() or "unknown"


def format_report(args: argparse.Namespace, results: dict[tuple[str, str], list[Outcome]],
                  cpu: dict[tuple[str, str, str], list[float]]) -> str:
    lines = [
        "# HTTP proxy: direct vs through pgproxy",
        "",
        f"`bench/http_compare.py --workers {args.workers} --duration {args.duration:g} --rounds {args.rounds}` "
        f"at {revision()} on {platform.node()} ({os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Same upstream (aiohttp app, its own process), same client (aiohttp, "
        f"{args.workers} concurrent workers, this process). The proxy is `pgproxy serve` (its own process): it "
        "checks an ES256 JWT (verified once, then reused for up to 30 s), applies the policy, injects a bearer "
        "credential, scans the response for it, "
        "masks `$.customer.email` in the audit record and writes a JSON-lines audit record per request. "
        "Median over rounds; latencies pooled over rounds.",
        "",
    ]
    lines += ratio_tables(list(SCENARIOS), results, cpu, "req/s", "req", "request")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
