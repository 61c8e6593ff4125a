"""Calls per second straight to a gRPC upstream versus through pgproxy's gRPC proxy, in one run.

The upstream (a grpc.aio server of tests/grpc/protos/shop.proto, compiled here with grpcio-tools) and
the proxy (`pgproxy serve`, JSON-lines audit, a metadata credential injected, the JWT checked on every
call (a verified token is reused for up to 30 s, as in production), messages decoded with a descriptor
set and masked) run as separate processes; the client is a grpc.aio channel with N concurrent workers,
the same code and settings for both paths. Each round runs every scenario on both paths, alternating
which goes first; the report gives the median over rounds, the proxy/direct ratios and the CPU time
per call of each process. A benchmark, not a test: it never fails on slow numbers. Run:

    .venv/bin/python bench/grpc_compare.py [--workers 16] [--duration 5] [--rounds 3] [--out bench/results/grpc.md]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import grpc_tools
import yaml
from grpc_tools import protoc
from http_compare import Outcome, free_port, measure, ratio_tables, revision, wait_port

from pgproxy.identity import generate_dev_keys, mint_token

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "tests" / "grpc" / "protos" / "shop.proto"
ISSUER, AUDIENCE = "https://issuer.bench", "pgproxy-bench"
STREAM_LENGTH = 100


def compile_proto(out: Path) -> tuple[Any, Any, Path]:
    """(shop_pb2, shop_pb2_grpc, descriptor set file) compiled into ``out``."""
    include = Path(grpc_tools.__file__).parent / "_proto"
    descriptors = out / "shop.desc"
    rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", f"--descriptor_set_out={descriptors}", "--include_imports",
                      str(PROTO)])
    if rc != 0:
        raise RuntimeError("protoc failed")
    sys.path.insert(0, str(out))
    return importlib.import_module("shop_pb2"), importlib.import_module("shop_pb2_grpc"), descriptors


async def serve_upstream(port: int, pb2: Any, pb2_grpc: Any) -> None:
    the_order = pb2.Order(id=7, total_cents=1999,
                          customer=pb2.Customer(name="Ann", email="ann@example.com", card="4111111111111111"),
                          items=[pb2.Item(sku="A1", ssn="111-22-3333", qty=1)], labels={"tier": "gold"})

    class Orders(pb2_grpc.OrdersServicer):  # type: ignore[misc]
        async def GetOrder(self, request: Any, context: Any) -> Any:
            return the_order

        async def ListOrders(self, request: Any, context: Any) -> AsyncIterator[Any]:
            for _ in range(request.count):
                yield the_order

    class Echo(pb2_grpc.EchoServicer):  # type: ignore[misc]
        async def Echo(self, request: Any, context: Any) -> Any:
            return pb2.EchoReply(text=request.text)

    server = grpc.aio.server()
    pb2_grpc.add_OrdersServicer_to_server(Orders(), server)
    pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def scenarios(pb2: Any, pb2_grpc: Any) -> dict[str, Callable[[grpc.aio.Channel, Any], Any]]:
    """Each scenario: one call on a channel with the given metadata."""
    async def get_order(channel: grpc.aio.Channel, metadata: Any) -> None:
        await pb2_grpc.OrdersStub(channel).GetOrder(pb2.GetOrderRequest(id=7), metadata=metadata)

    async def list_orders(channel: grpc.aio.Channel, metadata: Any) -> None:
        async for _ in pb2_grpc.OrdersStub(channel).ListOrders(pb2.ListRequest(count=STREAM_LENGTH),
                                                                metadata=metadata):
            pass

    async def echo(channel: grpc.aio.Channel, metadata: Any) -> None:
        await pb2_grpc.EchoStub(channel).Echo(pb2.EchoRequest(text="x" * 100), metadata=metadata)

    return {"unary GetOrder (decoded, masked)": get_order,
            f"server stream of {STREAM_LENGTH} orders": list_orders,
            "unary Echo (digest only)": echo}


async def load(address: str, call: Callable[[grpc.aio.Channel, Any], Any], metadata: Any, workers: int,
               duration: float) -> tuple[float, list[float], int]:
    """(calls/s, latencies in ms, errors) with ``workers`` concurrent callers for ``duration`` s."""
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        await call(channel, metadata)  # connected (and descriptors loaded) before the clock starts
        stop = time.monotonic() + duration

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop:
                t = time.perf_counter()
                try:
                    await call(channel, metadata)
                except grpc.aio.AioRpcError:
                    errors += 1
                latencies.append((time.perf_counter() - t) * 1000)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.monotonic() - started
    return len(latencies) / elapsed, latencies, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grpc.md")
    ap.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--generated", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_upstream:
        sys.path.insert(0, str(args.generated))
        pb2, pb2_grpc = importlib.import_module("shop_pb2"), importlib.import_module("shop_pb2_grpc")
        asyncio.run(serve_upstream(args.serve_upstream, pb2, pb2_grpc))
        return
    with tempfile.TemporaryDirectory(prefix="pgproxy-grpc-bench-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    pb2, pb2_grpc, descriptors = compile_proto(tmp)
    keys = generate_dev_keys(tmp / "keys")
    up_port, grpc_port = free_port(), free_port()
    upstream_address = f"127.0.0.1:{up_port}"
    credential = {"kind": "metadata", "key": "x-api-key", "value_env": "BENCH_UPSTREAM_KEY"}
    config = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["ES256"],
                     "jwks_file": str(keys.jwks_file), "default_db_role": "bench"},
        "upstream": {"credentials": [{"role": "*"}]},
        "audit": {"jsonl_path": str(tmp / "audit.jsonl")},
        "grpc": {"listen": {"host": "127.0.0.1", "port": grpc_port, "insecure_plaintext": True},
                 "targets": [
                     {"name": "orders", "upstream": upstream_address, "services": ["shop.v1.Orders"],
                      "credential": credential, "descriptors": {"file": str(descriptors)},
                      "masks": [{"paths": ["customer.email", "items[*].ssn"]},
                                {"paths": ["customer.card"], "in": ["response"], "caller": True}]},
                     {"name": "echo", "upstream": upstream_address, "services": ["shop.v1.Echo"],
                      "credential": credential, "undecodable": "digest"}],
                 "default": "allow"},
    }
    (tmp / "pgproxy.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "BENCH_UPSTREAM_KEY": "bench-upstream-secret-0123456789"}
    upstream = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(up_port), "--generated", str(tmp)])
    proxy = subprocess.Popen([sys.executable, "-m", "pgproxy", "--log-level", "WARNING", "serve", "-c",
                              str(tmp / "pgproxy.yaml")], env=env)
    calls = scenarios(pb2, pb2_grpc)
    try:
        wait_port(up_port, upstream)
        wait_port(grpc_port, proxy)
        token = mint_token(keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject="bench",
                           ttl_seconds=3600)
        paths = {"direct": (upstream_address, ()),
                 "proxy": (f"127.0.0.1:{grpc_port}", (("authorization", f"Bearer {token}"),))}

        def once(name: str, which: str) -> Outcome:
            address, metadata = paths[which]
            return asyncio.run(load(address, calls[name], metadata, args.workers, args.duration))

        results, cpu = measure(list(calls), list(paths), args.rounds, {"upstream": upstream.pid, "proxy": proxy.pid},
                               once, "calls/s")
        report = format_report(args, calls, results, cpu)
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


def format_report(args: argparse.Namespace, calls: dict[str, Any], results: dict[tuple[str, str], list[Outcome]],
                  cpu: dict[tuple[str, str, str], list[float]]) -> str:
    lines = [
        "# gRPC proxy: direct vs through pgproxy",
        "",
        f"`bench/grpc_compare.py --workers {args.workers} --duration {args.duration:g} --rounds {args.rounds}` "
        f"at {revision()} on {platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Same upstream (grpc.aio server, its own process), same client (one grpc.aio channel, "
        f"{args.workers} concurrent workers, this process). The proxy is `pgproxy serve` (its own process): it "
        "checks an ES256 JWT (verified once, then reused for up to 30 s), applies the policy, injects a metadata "
        "credential, scans every message for it and writes a JSON-lines `grpc_call` record per call. Orders "
        "messages are decoded with a descriptor set, masked in the record (`customer.email`, `items[*].ssn`) "
        "and for the caller (`customer.card`, so the message is re-encoded); Echo goes to a target without "
        "descriptors (`undecodable: digest`): relayed and recorded by digest only. Median over rounds; "
        "latencies pooled over rounds.",
        "",
    ]
    lines += ratio_tables(list(calls), results, cpu, "calls/s", "call", "call")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
