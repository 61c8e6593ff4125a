"""The gRPC companion proxy: a grpc.aio server relaying any method, with the HTTP side's controls.

One generic handler serves every method as a bidirectional stream of raw bytes (on the wire, unary
and streaming calls differ only in how many messages flow), so any service can be relayed without
its generated code; methods the loaded descriptors say are unary are served as unary calls, which
grpc.aio handles with less work. A call to ``/pkg.Service/Method`` goes to the first target whose ``services``
match. Every call needs ``authorization: Bearer <JWT>`` metadata (the Postgres side's TokenVerifier
and claim mapping); the proxy replaces it with the target's own credential (metadata, and/or the
client certificate of the TLS channel), which the caller never sees.

Messages are decoded with the target's descriptors only to check them, mask them and record them;
messages that cannot be decoded are refused, or with ``undecodable: digest`` relayed and recorded by
digest. Backpressure is gRPC's own: the next message is read from one side only after the previous
one was handed to the other. The caller's deadline (capped by the target's ``timeout_seconds``) is
the upstream call's; a cancelled call is cancelled upstream.

Refusals are gRPC statuses: UNAUTHENTICATED token, PERMISSION_DENIED policy or denied approval,
UNIMPLEMENTED no target or unknown method, FAILED_PRECONDITION approval required (the approval id in
the status details), INVALID_ARGUMENT undecodable request, INTERNAL undecodable response, UNAVAILABLE
upstream down, approval store or audit log unavailable, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED size.
One ``grpc_call`` audit record per call (docs/grpc.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from ..audit.guard import AuditGuard
from ..audit.sink import AuditSink
from ..config import ConfigError
from ..http.gate import HttpApprovals
from ..http.jsonmask import JsonPath
from ..http.scrub import Scrubber
from ..identity import Identity, TokenError, TokenVerifier
from ..identity.reuse import VerifiedTokens
from ..policy.approval_factory import new_request
from ..policy.approvals import ApprovalStore
from ..policy.rules import Decision
from .audit import StreamTap, message_record, metadata_record
from .config import MIN_SCRUB_CHARS, GrpcConfig, TargetConfig
from .descriptors import (
    DescriptorError,
    Method,
    decode,
    fetch_by_reflection,
    mask_message,
)

log = logging.getLogger(__name__)

Code = grpc.StatusCode
Metadata = Sequence[tuple[str, str | bytes]]
# Never forwarded from the caller (nor any grpc-* key): the token, transport headers gRPC sets itself.
_NOT_FORWARDED = frozenset({"authorization", "user-agent", "te", "content-type", "host"})
DETAILS_KEY = "grpc-status-details-bin"
APPROVAL_KEY = "pgproxy-approval-id"
CALL_KEY = "pgproxy-call-id"
DESCRIPTOR_TIMEOUT = 10.0
# Statuses that, with no metadata and no message, come from the channel rather than the upstream.
_NO_ANSWER = {Code.UNAVAILABLE: "connection", Code.DEADLINE_EXCEEDED: "deadline", Code.CANCELLED: "cancelled"}
# HTTP-style verdicts of the shared approval gate, as gRPC codes.
_APPROVAL_CODES = {428: Code.FAILED_PRECONDITION, 403: Code.PERMISSION_DENIED, 503: Code.UNAVAILABLE,
                   504: Code.DEADLINE_EXCEEDED}


class _Refused(Exception):
    """The proxy ends the call itself with this status."""

    def __init__(self, code: grpc.StatusCode, message: str, *, approval_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.approval_id = approval_id


def grpc_session_id(identity: Identity) -> str:
    """The audit "session" of a gRPC caller: one per token, so an export bundles a token's calls."""
    return "grpc-" + hashlib.sha256(identity.token_id.encode()).hexdigest()[:12]


def refusal_trailers(code: grpc.StatusCode, message: str, call_id: str,
                     approval_id: str | None) -> list[tuple[str, str | bytes]]:
    """Trailing metadata of a refusal: the call id, and for approvals a google.rpc.Status with an ErrorInfo."""
    trailers: list[tuple[str, str | bytes]] = [(CALL_KEY, call_id)]
    if approval_id is not None:
        info = error_details_pb2.ErrorInfo(reason="APPROVAL_REQUIRED" if code == Code.FAILED_PRECONDITION
                                           else "APPROVAL_NOT_GRANTED", domain="pgproxy",
                                           metadata={"approval_id": approval_id})
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
        trailers += [(APPROVAL_KEY, approval_id), (DETAILS_KEY, status.SerializeToString())]
    return trailers


@dataclass
class _Upstream:
    """A target with its channel, its resolved credential and its descriptors (loaded on first use)."""

    config: TargetConfig
    channel: grpc.aio.Channel
    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, Any]]
    credential: tuple[str, str] | None  # metadata key, value
    scrub: tuple[str, ...]
    scrubber: Scrubber
    secret_keys: tuple[str, ...]
    methods: dict[str, Method] | None = None
    descriptor_error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    callables: dict[tuple[str, bool], Any] = field(default_factory=dict)
    paths: dict[tuple[str, str, bool], tuple[JsonPath, ...]] = field(default_factory=dict)

    def mask_paths(self, message_type: str, direction: str, *, caller: bool = False) -> tuple[JsonPath, ...]:
        """The target's mask paths for a message type and direction (computed once per type)."""
        key = (message_type, direction, caller)
        paths = self.paths.get(key)
        if paths is None:
            paths = self.paths[key] = self.config.mask_paths(message_type, direction, caller=caller)
        return paths

    async def method(self) -> dict[str, Method] | None:
        """The descriptors' method table (None, with ``descriptor_error``, when it cannot be had)."""
        target = self.config
        if self.methods is not None or not target.reflection:
            return self.methods
        async with self.lock:  # by reflection (a descriptor file was read at start)
            if self.methods is None:
                try:
                    self.methods = await asyncio.to_thread(
                        fetch_by_reflection, target.upstream, self.credentials, self.options,
                        (self.credential,) if self.credential else (), DESCRIPTOR_TIMEOUT)
                    self.descriptor_error = None
                except DescriptorError as exc:
                    self.descriptor_error = str(exc)
                    log.warning("grpc target %s: no descriptors: %s", target.name, exc)
        return self.methods

    def callable(self, path: str, unary: bool) -> Any:
        """The channel's multi-callable for ``path``: unary-unary (cheaper) or stream-stream (any kind)."""
        multi = self.callables.get((path, unary))
        if multi is None:
            multi = self.callables[(path, unary)] = (self.channel.unary_unary(path) if unary
                                                     else self.channel.stream_stream(path))
        return multi


@dataclass
class _Call:
    """What one call did, for its audit record."""

    id: str
    started: float
    t0: float
    path: str
    client: str
    identity: Identity | None = None
    target: str | None = None
    decision: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None
    request_metadata: dict[str, str] = field(default_factory=dict)
    requests: StreamTap | None = None
    responses: StreamTap | None = None
    upstream_responses: StreamTap | None = None  # what the upstream sent, when the caller got it changed
    response_metadata: dict[str, str] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    refusal: _Refused | None = None
    scrubbed: int = 0
    masked_for_caller: set[str] = field(default_factory=set)
    upstream_ms: float | None = None
    answered: bool = False  # the upstream sent metadata, a message or its own status


class GrpcProxy:
    """The gRPC listener."""

    def __init__(self, config: GrpcConfig, *, verifier: TokenVerifier, audit: AuditSink,
                 approval_store: ApprovalStore | None = None) -> None:
        self.config = config
        self.approvals = HttpApprovals(approval_store, audit)
        self._tokens = VerifiedTokens(verifier)
        self._upstreams: dict[str, _Upstream] = {}
        self._server: grpc.aio.Server | None = None
        self._port = 0
        self._recorder = AuditGuard(audit, "grpc call")

    def use_verifier(self, verifier: TokenVerifier) -> None:
        """Verify callers' tokens with ``verifier`` from the next call on (a config reload)."""
        self._tokens = VerifiedTokens(verifier)

    # ------------------------------------------------------------------------------------ lifecycle

    def _resolve(self, target: TargetConfig) -> _Upstream:
        credential: tuple[str, str] | None = None
        scrub: tuple[str, ...] = ()
        if target.credential is not None:
            key, value, secret = target.credential.resolve()
            credential = (key, value)
            scrub = (secret,) if len(secret) >= MIN_SCRUB_CHARS else ()
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", target.max_message_bytes),
                                          ("grpc.max_send_message_length", target.max_message_bytes),
                                          ("grpc.enable_retries", 0)]
        credentials = None
        if target.tls is not None:
            root, key_pem, chain = target.tls.load()
            credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key_pem,
                                                       certificate_chain=chain)
            if target.tls.server_name:
                options.append(("grpc.ssl_target_name_override", target.tls.server_name))
        channel = (grpc.aio.secure_channel(target.upstream, credentials, options) if credentials is not None
                   else grpc.aio.insecure_channel(target.upstream, options))
        secret_keys = (credential[0],) if credential is not None else ()
        upstream = _Upstream(target, channel, credentials, options, credential, scrub, Scrubber(scrub), secret_keys)
        if target.descriptor_file is not None:  # read now: a bad file stops the start, not the first call
            upstream.methods = target.load_descriptors()
        return upstream

    async def start(self) -> None:
        """Read the credentials and TLS files (ConfigError if one is missing) and listen."""
        listen = self.config.listen
        try:
            for target in self.config.targets:
                self._upstreams[target.name] = self._resolve(target)
            server_credentials = None
            if listen.tls is not None:
                try:
                    pair = (listen.tls.key_file.read_bytes(), listen.tls.cert_file.read_bytes())
                except OSError as exc:
                    raise ConfigError(f"grpc.listen.tls: cannot read {exc.filename}: {exc.strerror}") from None
                server_credentials = grpc.ssl_server_credentials([pair])
            largest = max(t.max_message_bytes for t in self.config.targets)
            server = grpc.aio.server(options=[("grpc.max_receive_message_length", largest),
                                              ("grpc.max_send_message_length", largest),
                                              ("grpc.so_reuseport", 0)])
            server.add_generic_rpc_handlers([_Handler(self)])
            address = f"{listen.host}:{listen.port}" if ":" not in listen.host else f"[{listen.host}]:{listen.port}"
            port = (server.add_secure_port(address, server_credentials) if server_credentials is not None
                    else server.add_insecure_port(address))
            if not port:
                raise OSError(f"cannot listen on {address}")
            await server.start()
        except BaseException:
            await self._close_channels()
            raise
        self._server, self._port = server, port
        log.info("grpc proxy listening on %s:%d (%s)", listen.host, port, "tls" if server_credentials else "plaintext")

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._port

    async def _close_channels(self) -> None:
        for upstream in self._upstreams.values():
            await upstream.channel.close()
        self._upstreams.clear()

    async def close(self, grace: float = 2.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
        await self._close_channels()

    # ----------------------------------------------------------------------------------------- calls

    async def handle(self, path: str, metadata: Metadata, requests: AsyncIterator[bytes],
                     context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncGenerator[bytes, None]:
        """One call: the messages for the caller; the status goes on ``context``, the record to the audit log."""
        call = _Call(id=secrets.token_hex(8), started=time.time(), t0=time.monotonic(), path=path,
                     client=context.peer())
        try:
            async with contextlib.aclosing(self._serve(call, metadata, requests, context)) as messages:
                async for message in messages:
                    yield message
        except _Refused as exc:
            call.refusal = exc
        except (asyncio.CancelledError, GeneratorExit):
            call.status = {"code": Code.CANCELLED.name, "message": "cancelled by the caller or its deadline"}
            if call.identity is not None:
                self._record_call(call)
            raise
        except Exception:  # a bug must not leave the call unrecorded or hanging
            log.exception("grpc call %s failed", call.id)
            call.refusal = _Refused(Code.INTERNAL, "internal proxy error")
        if call.refusal is not None:
            refusal = call.refusal
            call.status = {"code": refusal.code.name, "message": refusal.message, "by": "proxy"}
            if refusal.approval_id is not None:
                call.status["approval_id"] = refusal.approval_id
            context.set_code(refusal.code)
            context.set_details(refusal.message)
            context.set_trailing_metadata(refusal_trailers(refusal.code, refusal.message, call.id,
                                                           refusal.approval_id))
        if call.identity is not None:
            self._record_call(call)

    async def handle_unary(self, path: str, metadata: Metadata, request: bytes,
                           context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes | None:
        """A call of a method the descriptors say is unary (grpc.aio serves those more cheaply): the same
        steps as ``handle``; None with the status set on ``context`` when there is no answer."""
        async def requests() -> AsyncIterator[bytes]:
            yield request

        answer = None
        async with contextlib.aclosing(self.handle(path, metadata, requests(), context)) as messages:
            async for message in messages:
                answer = message
        return answer

    def unary(self, path: str) -> bool:
        """True when ``path`` is a unary method of its target's descriptors, as far as they are loaded."""
        service = path.lstrip("/").partition("/")[0]
        target = self.config.route(service)
        methods = self._upstreams[target.name].methods if target is not None else None
        info = methods.get(path) if methods is not None else None
        return info is not None and not info.client_streaming and not info.server_streaming

    async def _serve(self, call: _Call, metadata: Metadata, requests: AsyncIterator[bytes],
                     context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncGenerator[bytes, None]:
        call.identity = await self._authenticate(call, metadata)
        if not self._recorder.writable():
            raise _Refused(Code.UNAVAILABLE, "the audit log is unavailable; calls are refused until it recovers")
        service, _, method = call.path.lstrip("/").partition("/")
        if not call.path.startswith("/") or not service or not method or "/" in method:
            raise _Refused(Code.UNIMPLEMENTED, f"malformed method path {call.path!r}")
        target = self.config.route(service)
        if target is None:
            raise _Refused(Code.UNIMPLEMENTED, f"no target serves {service}")
        upstream = self._upstreams[target.name]
        call.target = target.name
        call.request_metadata = metadata_record(metadata, upstream.secret_keys)
        decision = self.config.policy.decide(call.identity, target.name, service, method)
        call.decision = {"action": decision.action, "rule": decision.rule}
        if decision.action == "deny":
            raise _Refused(Code.PERMISSION_DENIED, f"pgproxy policy {decision.rule}: {decision.message}")
        methods = await upstream.method()
        info = methods.get(call.path) if methods is not None else None
        if info is not None:
            call.kind = _kind(info)
        elif target.undecodable == "refuse":
            if methods is None and target.reflection:
                raise _Refused(Code.UNAVAILABLE, f"descriptors of target {target.name} are unavailable "
                               f"({upstream.descriptor_error}); calls are refused until they can be read")
            raise _Refused(Code.UNIMPLEMENTED, f"{call.path} is not in the descriptors of target {target.name}; "
                           "calls that cannot be decoded are refused")
        call.requests = StreamTap(self.config.audit_messages)
        call.responses = StreamTap(self.config.audit_messages)
        buffered: list[bytes] | None = None
        if decision.action == "approve":
            buffered = await self._read_all(call, upstream, info, requests)
            await self._approve(call, decision, upstream, info)
        elif info is not None and not info.client_streaming:
            buffered = await self._read_all(call, upstream, info, requests)  # one message: checked before the call
        async with contextlib.aclosing(self._relay(call, upstream, info, metadata, requests, buffered,
                                                   context)) as messages:
            async for message in messages:
                yield message

    async def _authenticate(self, call: _Call, metadata: Metadata) -> Identity:
        values = [v for k, v in metadata if k == "authorization"]
        try:
            return await self._tokens.bearer(values[0] if len(values) == 1 and isinstance(values[0], str) else None,
                                             "authorization: Bearer <JWT> metadata")
        except TokenError as exc:
            reason = exc.reason
        self._emit({"event": "grpc_auth_failed", "ts": call.started, "call": call.id, "client": call.client,
                    "method": call.path, "reason": reason})
        raise _Refused(Code.UNAUTHENTICATED, reason)

    # ------------------------------------------------------------------------------------- requests

    def _decode(self, upstream: _Upstream, cls: type[Message] | None, data: bytes, refusal: grpc.StatusCode,
                what: str) -> Message | None:
        """``data`` parsed as ``cls``; refused with ``refusal`` if it cannot be and the target says so."""
        if cls is None:
            return None
        message = decode(cls, data)
        if message is None and upstream.config.undecodable == "refuse":
            raise _Refused(refusal, f"{what} cannot be decoded as {cls.DESCRIPTOR.full_name}; it is refused")
        return message

    def _record(self, upstream: _Upstream, data: bytes, message: Message | None, cls: type[Message] | None,
                direction: str) -> dict[str, Any]:
        paths = upstream.mask_paths(cls.DESCRIPTOR.full_name, direction) if cls is not None else ()
        return message_record(data, message, paths, self.config.audit_message_bytes, upstream.scrub)

    def _check_request(self, call: _Call, upstream: _Upstream, info: Method | None, data: bytes) -> None:
        """Decode, record and digest one request message; refuses an undecodable one (fail closed)."""
        tap = call.requests
        assert tap is not None
        limit = upstream.config.max_message_bytes
        if len(data) > limit:  # the listener accepts the largest limit of all targets
            raise _Refused(Code.RESOURCE_EXHAUSTED, f"request message of {len(data)} bytes is over the limit of "
                           f"{limit} bytes of target {upstream.config.name}")
        cls = info.input if info is not None else None
        message = self._decode(upstream, cls, data, Code.INVALID_ARGUMENT, f"request message {tap.count + 1}")
        if tap.wants_record:
            tap.messages.append(self._record(upstream, data, message, cls, "request"))
        tap.feed(data)

    async def _read_all(self, call: _Call, upstream: _Upstream, info: Method | None,
                        requests: AsyncIterator[bytes]) -> list[bytes]:
        """The whole request stream, checked (for approvals: its digest must be known before it is sent)."""
        target = upstream.config
        messages: list[bytes] = []
        total = 0
        try:
            async with asyncio.timeout(target.timeout_seconds):  # a caller that never closes its side
                async for data in requests:
                    self._check_request(call, upstream, info, data)
                    total += len(data)
                    if total > target.max_message_bytes:
                        raise _Refused(Code.RESOURCE_EXHAUSTED, f"the request stream is over "
                                       f"{target.max_message_bytes} bytes, the most a call that is read whole "
                                       "(approvals, single requests) may send")
                    messages.append(data)
        except TimeoutError:
            raise _Refused(Code.DEADLINE_EXCEEDED, f"the request stream did not end within "
                           f"{target.timeout_seconds:g} s (timeout_seconds of target {target.name})") from None
        return messages

    async def _approve(self, call: _Call, decision: Decision, upstream: _Upstream, info: Method | None) -> None:
        assert call.identity is not None and call.requests is not None and decision.approval is not None
        requirement = decision.approval
        if info is not None and info.client_streaming and info.server_streaming:
            raise _Refused(Code.FAILED_PRECONDITION, f"rule {decision.rule} requires an approval, which cannot "
                           "cover a bidirectional stream (its requests are not known in advance)")
        pending = new_request(
            requester=call.identity.audit_fields(), database=f"grpc:{upstream.config.name}", sql=call.path,
            params=[f"sha256:{call.requests.sha256}"],
            classification={"classes": ["grpc"], "reasons": list(decision.reasons), "target": upstream.config.name,
                            "method": call.path, "messages": call.requests.count,
                            "request": call.requests.messages[:4]},
            rule=decision.rule, approver_groups=requirement.approvers, required_approvals=requirement.approvals,
            mode="hold" if requirement.mode == "hold" else "refuse", expiry_seconds=requirement.expires)
        verdict = await self.approvals.check(grpc_session_id(call.identity), call.id, pending, decision)
        call.decision["approval_id"] = verdict.approval_id
        if verdict.status:
            raise _Refused(_APPROVAL_CODES.get(verdict.status, Code.PERMISSION_DENIED), verdict.message,
                           approval_id=verdict.approval_id)

    # ------------------------------------------------------------------------------------- upstream

    def _forwarded(self, metadata: Metadata, upstream: _Upstream) -> list[tuple[str, str | bytes]]:
        dropped = _NOT_FORWARDED | set(upstream.secret_keys)
        out = [(k, v) for k, v in metadata if k not in dropped and not k.startswith((":", "grpc-"))]
        if upstream.credential is not None:
            out.append(upstream.credential)
        return out

    def _returned(self, metadata: Metadata | None, upstream: _Upstream, call: _Call) -> list[tuple[str, str | bytes]]:
        """Upstream metadata for the caller: transport keys dropped, the credential starred out."""
        out: list[tuple[str, str | bytes]] = []
        for k, v in metadata or ():
            if k.startswith((":", "grpc-")) and k != DETAILS_KEY:
                continue
            if upstream.scrubber:
                scrubber = upstream.scrubber.fresh()
                v = scrubber.text(v) if isinstance(v, str) else scrubber.whole(v)
                call.scrubbed += scrubber.replaced
            out.append((k, v))
        return out

    async def _relay(self, call: _Call, upstream: _Upstream, info: Method | None, metadata: Metadata,
                     requests: AsyncIterator[bytes], buffered: list[bytes] | None,
                     context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncGenerator[bytes, None]:
        target = upstream.config
        timeout = target.timeout_seconds
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining, 0.001))
        refusal: list[_Refused] = []
        upstream_call: Any = None

        async def outgoing() -> AsyncIterator[bytes]:
            if buffered is not None:
                for data in buffered:
                    yield data
                return
            async for data in requests:
                try:
                    self._check_request(call, upstream, info, data)
                except _Refused as exc:
                    refusal.append(exc)
                    if upstream_call is not None:
                        upstream_call.cancel()
                    return
                yield data

        forwarded = grpc.aio.Metadata(*self._forwarded(metadata, upstream))
        unary = (info is not None and not info.client_streaming and not info.server_streaming
                 and buffered is not None and len(buffered) == 1)
        upstream_call = upstream.callable(call.path, unary)(buffered[0] if unary and buffered else outgoing(),
                                                            timeout=timeout, metadata=forwarded)
        initial: list[tuple[str, str | bytes]] = []
        try:
            initial = self._returned(await upstream_call.initial_metadata(), upstream, call)
            call.upstream_ms = round((time.monotonic() - call.t0) * 1000, 3)
            call.response_metadata = metadata_record(initial, upstream.secret_keys)
            if initial:
                await context.send_initial_metadata(initial)
            if unary:
                yield self._check_response(call, upstream, info, await upstream_call)
            else:
                async for data in upstream_call:
                    yield self._check_response(call, upstream, info, data)
            code, details = await upstream_call.code(), await upstream_call.details()
            trailing = await upstream_call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            code, details, trailing = exc.code(), exc.details() or "", exc.trailing_metadata()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not refusal or (task is not None and task.cancelling()):
                raise  # the caller went away
            code, details, trailing = Code.CANCELLED, "", None  # ended by outgoing(): the refusal is the status
        finally:  # refused, or the caller went away (cancelled, deadline, closed this generator)
            if not upstream_call.done():
                upstream_call.cancel()
        if refusal:
            raise refusal[0]
        # No metadata, no message and a transport status: the upstream never answered (down, or too slow).
        call.answered = bool(initial) or bool(call.responses and call.responses.count) or code not in _NO_ANSWER
        if not call.answered:
            log.info("grpc call %s: upstream %s: %s: %s", call.id, target.name, code.name, details)
        if upstream.scrubber and details:
            scrubber = upstream.scrubber.fresh()
            details = scrubber.text(details)
            call.scrubbed += scrubber.replaced
        returned = self._returned(trailing, upstream, call)
        call.status = {"code": code.name, "message": details or "",
                       "by": "upstream" if call.answered else _NO_ANSWER[code]}
        if returned:
            call.status["trailers"] = metadata_record(returned, upstream.secret_keys)
        if code != Code.OK:
            context.set_code(code)
            context.set_details(details or "")
        context.set_trailing_metadata([*returned, (CALL_KEY, call.id)])

    def _check_response(self, call: _Call, upstream: _Upstream, info: Method | None, data: bytes) -> bytes:
        """One upstream message as the caller gets it: checked, masked where configured, recorded."""
        tap = call.responses
        assert tap is not None
        cls = info.output if info is not None else None
        message = self._decode(upstream, cls, data, Code.INTERNAL, f"upstream {upstream.config.name}'s message")
        record = self._record(upstream, data, message, cls, "response") if tap.wants_record else None
        out = data
        if message is not None and cls is not None:
            caller_paths = upstream.mask_paths(cls.DESCRIPTOR.full_name, "response", caller=True)
            hits = mask_message(message, caller_paths) if caller_paths else []
            if hits:
                out = message.SerializeToString()
                call.masked_for_caller.update(hits)
        if upstream.scrubber:
            scrubber = upstream.scrubber.fresh()
            out = scrubber.whole(out)
            call.scrubbed += scrubber.replaced
        if out is not data or call.upstream_responses is not None:
            if call.upstream_responses is None:  # from here on the caller's stream differs: keep both digests
                call.upstream_responses = tap.copy()
            call.upstream_responses.feed(data)
        if record is not None:
            if out is not data:
                record.update(bytes=len(out), sha256=hashlib.sha256(out).hexdigest(),
                              upstream_sha256=record["sha256"])
            tap.messages.append(record)
        tap.feed(out)
        return out

    # ----------------------------------------------------------------------------------------- audit

    def _record_call(self, call: _Call) -> None:
        assert call.identity is not None
        event: dict[str, Any] = {
            "event": "grpc_call", "ts": call.started, "session": grpc_session_id(call.identity), "call": call.id,
            "identity": call.identity.audit_fields(), "client": call.client, "target": call.target,
            "method": call.path, "kind": call.kind, "decision": call.decision,
            "request": {"metadata": call.request_metadata},
            "status": call.status,
            "timings": {"started_at": call.started, "upstream_headers_ms": call.upstream_ms,
                        "total_ms": round((time.monotonic() - call.t0) * 1000, 3)}}
        if call.requests is not None:
            event["request"]["messages"] = call.requests.record()
        if call.responses is not None and call.answered:
            response: dict[str, Any] = {"metadata": call.response_metadata, "messages": call.responses.record()}
            if call.upstream_responses is not None:
                response["upstream_sha256"] = call.upstream_responses.sha256
            if call.masked_for_caller:
                response["masked_for_caller"] = sorted(call.masked_for_caller)
            if call.scrubbed:
                response["credential_scrubbed"] = call.scrubbed
            event["response"] = response
        self._emit(event)

    def _emit(self, event: dict[str, Any]) -> None:
        self._recorder.emit(event, event.get("call"))


def _kind(info: Method) -> str:
    return {(False, False): "unary", (False, True): "server_streaming", (True, False): "client_streaming",
            (True, True): "bidi_streaming"}[(info.client_streaming, info.server_streaming)]


class _Handler(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpcio has no type hints
    """Every method, as a bidirectional stream of raw bytes (unary methods known from the descriptors as
    unary calls: on the wire they are the same, grpc.aio serves them with less work)."""

    def __init__(self, proxy: GrpcProxy) -> None:
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        metadata: Metadata = tuple(details.invocation_metadata or ())
        if self.proxy.unary(details.method):
            return grpc.unary_unary_rpc_method_handler(functools.partial(self.proxy.handle_unary, details.method,
                                                                         metadata))
        # A partial of the async generator method: grpc.aio recognises it as one and relays what it yields.
        return grpc.stream_stream_rpc_method_handler(functools.partial(self.proxy.handle, details.method, metadata))
