"""Helpers for the gRPC proxy tests (importable by name): the compiled test proto, a real grpcio upstream
server (tests/grpc/protos/shop.proto) and the proxy config.

The proto is compiled once per test run with grpcio-tools (``protoc`` as a library) into a temporary
directory: the generated modules and a FileDescriptorSet, which the proxy reads as its descriptors.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import hashlib
import importlib
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import grpc_tools
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_reflection.v1alpha import reflection
from grpc_tools import protoc
from harness import companion_config, companion_token

from pgproxy.audit.sink import AuditSink, MemoryAuditSink
from pgproxy.identity import DevKeys
from pgproxy.server.listener import ProxyServer
from pgproxy.tlsutil import DevTLS

PROTOS = Path(__file__).parent / "protos"


def _compile() -> tuple[Path, Path]:
    out = Path(tempfile.mkdtemp(prefix="pgproxy-grpc-proto-"))
    atexit.register(shutil.rmtree, out, True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    descriptor_set = out / "shop.desc"
    rc = protoc.main(["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                      f"--descriptor_set_out={descriptor_set}", "--include_imports", str(PROTOS / "shop.proto")])
    assert rc == 0, "protoc failed on shop.proto"
    return out, descriptor_set


GENERATED, DESCRIPTOR_SET = _compile()
sys.path.insert(0, str(GENERATED))
shop_pb2: Any = importlib.import_module("shop_pb2")
shop_pb2_grpc: Any = importlib.import_module("shop_pb2_grpc")

StartProxy = Callable[..., Awaitable[ProxyServer]]

CREDENTIAL_ENV = "PGPROXY_TEST_GRPC_CREDENTIAL"
CREDENTIAL = "sk-live-GRPC-UPSTREAM-0123456789"


def order(order_id: int, blob_bytes: int = 0) -> Any:
    return shop_pb2.Order(
        id=order_id, total_cents=1999,
        customer=shop_pb2.Customer(name="Ann", email="ann@example.com", card="4111111111111111"),
        items=[shop_pb2.Item(sku="A1", ssn="111-22-3333", qty=1), shop_pb2.Item(sku="B2", ssn="444-55-6666", qty=2)],
        blob=b"x" * blob_bytes, labels={"tier": "gold"})


@dataclass
class UpstreamState:
    """What the test upstream saw: metadata, refunds run, how far a stream got, cancelled calls."""

    metadata: list[dict[str, str]] = field(default_factory=list)
    refunds: list[tuple[int, int]] = field(default_factory=list)
    produced: int = 0
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class Orders(shop_pb2_grpc.OrdersServicer):  # type: ignore[misc]
    def __init__(self, state: UpstreamState) -> None:
        self.state = state

    def _seen(self, context: grpc.aio.ServicerContext) -> None:
        self.state.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})

    async def GetOrder(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._seen(context)
        if request.id == 404:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no order {request.id}")
        return order(request.id)

    async def DeleteOrder(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return order(request.id)

    async def Refund(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.state.refunds.append((request.order_id, request.amount_cents))
        return shop_pb2.RefundReply(refund_id=f"rf-{request.order_id}-{len(self.state.refunds)}")

    async def Payout(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self.Refund(request, context)

    async def ListOrders(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self.state.produced = 0
        try:
            for i in range(request.count):
                if request.fail_at and i == request.fail_at:
                    await context.abort(grpc.StatusCode.ABORTED, f"stopped at {i}")
                self.state.produced += 1
                yield order(i, request.blob_bytes)
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: closed while waiting to send
            self.state.cancelled.set()
            raise

    async def Upload(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        digest, count, size = hashlib.sha256(), 0, 0
        async for chunk in requests:
            digest.update(chunk.data)
            count += 1
            size += len(chunk.data)
        return shop_pb2.Summary(count=count, bytes=size, sha256=digest.hexdigest())

    async def Chat(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for chunk in requests:
            yield shop_pb2.Chunk(index=chunk.index * 10, data=chunk.data[::-1])

    async def Slow(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            self.state.cancelled.set()
            raise
        return order(request.id)


class Echo(shop_pb2_grpc.EchoServicer):  # type: ignore[misc]
    async def Echo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        received = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        cn = context.auth_context().get("x509_common_name", [b""])[0].decode()
        return shop_pb2.EchoReply(text=request.text, metadata=received, client_cn=cn)


@dataclass
class Upstream:
    server: grpc.aio.Server
    port: int
    state: UpstreamState

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_upstream(tls: DevTLS | None = None, *, reflection_service: bool = True,
                         orders: type[Orders] = Orders) -> Upstream:
    """The real test service on a free port (TLS requiring a client certificate when ``tls`` is given)."""
    state = UpstreamState()
    server = grpc.aio.server()
    shop_pb2_grpc.add_OrdersServicer_to_server(orders(state), server)
    shop_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    if reflection_service:
        names = [shop_pb2.DESCRIPTOR.services_by_name[n].full_name for n in ("Orders", "Echo")]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
                                            root_certificates=tls.ca_file.read_bytes(), require_client_auth=True)
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return Upstream(server, port, state)


def client_certificate(tls: DevTLS, directory: Path, name: str = "pgproxy-client") -> tuple[Path, Path]:
    """A client certificate for ``name`` signed by the dev CA: (cert file, key file)."""
    ca_key = serialization.load_pem_private_key(tls.ca_key_file.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(tls.ca_file.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def config_data(keys: DevKeys, upstream: str, tmp_path: Path, **grpc_section: Any) -> dict[str, Any]:
    """A full proxy config: the Postgres side on loopback plaintext, the grpc section on port 0."""
    section: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0, "insecure_plaintext": True},
        "targets": [
            {"name": "shop", "upstream": upstream, "services": ["shop.v1.*"],
             "credential": {"kind": "metadata", "key": "x-api-key", "value_env": CREDENTIAL_ENV},
             "descriptors": {"file": str(DESCRIPTOR_SET)}, "max_message_bytes": 256 * 1024,
             "masks": [{"paths": ["customer.email", "items[*].ssn"]},
                       {"paths": ["customer.card"], "in": ["response"], "caller": True,
                        "messages": ["shop.v1.Order"]}]},
            {"name": "down", "upstream": "127.0.0.1:9", "services": ["down.*"], "undecodable": "digest"},
        ],
        "rules": [
            {"name": "no-deletes", "match": {"methods": ["Delete*"]}, "action": "deny",
             "message": "deletes are not allowed"},
            {"name": "refunds", "match": {"services": ["shop.v1.Orders"], "methods": ["Refund"]},
             "action": "approve", "approvers": ["finance"], "mode": "refuse"},
            {"name": "payouts", "match": {"methods": ["Payout"]}, "action": "approve", "approvers": ["finance"],
             "mode": "hold", "timeout": 30},
        ],
        "default": "allow",
        "audit_messages": 5,
    }
    section.update(grpc_section)
    return companion_config(keys, tmp_path, "grpc", section)


token = companion_token


def bearer(jwt: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {jwt}"),)


def address(server: ProxyServer) -> str:
    assert server.grpc is not None
    return f"127.0.0.1:{server.grpc.port}"


def calls(audit: AuditSink) -> list[dict[str, Any]]:
    """The grpc_call records of a proxy's MemoryAuditSink."""
    assert isinstance(audit, MemoryAuditSink)
    return [e for e in audit.events if e.get("event") == "grpc_call"]


def stream_digest(messages: list[bytes]) -> str:
    """The digest the audit record gives a stream: SHA-256 over the messages framed as on the wire."""
    digest = hashlib.sha256()
    for m in messages:
        digest.update(b"\x00" + len(m).to_bytes(4, "big") + m)
    return digest.hexdigest()
