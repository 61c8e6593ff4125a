"""`pgproxy audit replay-grpc`: re-run a verified bundle's gRPC calls against a sandbox and compare digests.

Only calls whose request stream can be rebuilt exactly are sent: every request message must be in
the record (none left out past ``audit_messages``) and its JSON, encoded again with the descriptors
(a descriptor-set file, or the sandbox's server reflection), must hash to the recorded digest (a
masked or redacted message cannot, and the call is skipped with the reason). Each answer is compared
on its status code and on the digest of the response stream the upstream sent when recorded
(``upstream_sha256`` when the proxy changed messages for the caller, else the stream's ``sha256``).
The sandbox gets no credential from the proxy: pass its own with ``metadata``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf.json_format import ParseError

from ..audit.bundle import BundleError, verify_bundle
from ..audit.replay import ReplayError, ReplayOutcome, ReplayReport
from .audit import stream_digest
from .descriptors import DescriptorError, Method, fetch_by_reflection, from_json, load_descriptor_set


def rebuild_requests(event: Mapping[str, Any], method: Method) -> list[bytes] | None:
    """The exact request messages of a recorded call, or None when the record cannot reproduce them."""
    stream = (event.get("request") or {}).get("messages") or {}
    records = stream.get("messages") or []
    if stream.get("messages_omitted") or len(records) != stream.get("count"):
        return None
    out = []
    for record in records:
        if "json" not in record:
            return None
        try:
            data = from_json(method.input, record["json"]).SerializeToString(deterministic=True)
        except (ParseError, TypeError, ValueError):
            return None
        if hashlib.sha256(data).hexdigest() != record.get("sha256"):
            return None
        out.append(data)
    return out if stream_digest(out) == stream.get("sha256") else None


def skip_reason(event: Mapping[str, Any], methods: Mapping[str, Method]) -> str | None:
    response = event.get("response")
    if not isinstance(response, dict):
        return "no upstream answer was recorded (refused by the proxy, or the upstream never answered)"
    if response.get("credential_scrubbed"):
        return "the response echoed the proxy's credential (starred out when recorded)"
    method = methods.get(str(event.get("method")))
    if method is None:
        return "the method is not in the descriptors"
    if rebuild_requests(event, method) is None:
        return "the request messages cannot be rebuilt from the record (masked, redacted, left out or undecodable)"
    return None


async def _replay_one(channel: grpc.aio.Channel, event: Mapping[str, Any], methods: Mapping[str, Method],
                      metadata: tuple[tuple[str, str], ...], timeout: float) -> ReplayOutcome:
    index = int(event["index"])
    label = f"{event.get('target')}: {event.get('method')}"
    reason = skip_reason(event, methods)
    if reason is not None:
        return ReplayOutcome(index, label, "skipped", reason)
    path = str(event["method"])
    requests = rebuild_requests(event, methods[path]) or []
    received: list[bytes] = []
    call = channel.stream_stream(path)(iter(requests), metadata=metadata, timeout=timeout)
    try:
        async for data in call:
            received.append(data)
        code = await call.code()
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
    response = event["response"]
    expected = response.get("upstream_sha256") or response["messages"]["sha256"]
    recorded_code = (event.get("status") or {}).get("code")
    differences = []
    if code.name != recorded_code:
        differences.append(f"status {code.name} (recorded {recorded_code})")
    digest = stream_digest(received)
    if digest != expected:
        differences.append(f"{len(received)} messages, digest {digest[:16]}... (recorded {str(expected)[:16]}...)")
    if differences:
        return ReplayOutcome(index, label, "differ", "; ".join(differences))
    return ReplayOutcome(index, label, "match", f"status {code.name}, {len(received)} messages")


async def replay_grpc_bundle(path: Path, target: str, *, descriptor_set: Path | None = None,
                             metadata: Mapping[str, str] | None = None, ca_file: Path | None = None,
                             tls: bool = False, pubkeys: tuple[Path, ...] = (), timeout: float = 30.0,
                             progress: Callable[[ReplayOutcome, int, int], None] | None = None) -> ReplayReport:
    checked = verify_bundle(path, pubkeys=pubkeys)
    if not checked.ok:
        raise ReplayError(f"the bundle does not verify: {checked.problems[0]}")
    recorded = [e for e in checked.events if e.get("event") == "grpc_call"]
    if not recorded:
        raise ReplayError("the bundle holds no gRPC calls")
    credentials = None
    if tls or ca_file is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes() if ca_file else None)
    sent = tuple((metadata or {}).items())
    try:
        if descriptor_set is not None:
            methods = load_descriptor_set(descriptor_set.read_bytes())
        else:
            methods = await asyncio.to_thread(fetch_by_reflection, target, credentials, [], sent, timeout)
    except (DescriptorError, OSError) as exc:
        raise ReplayError(f"no descriptors: {exc}") from None
    report = ReplayReport()
    channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
               else grpc.aio.insecure_channel(target))
    async with channel:
        for n, event in enumerate(recorded, 1):
            outcome = await _replay_one(channel, event, methods, sent, timeout)
            report.outcomes.append(outcome)
            if progress is not None:
                progress(outcome, n, len(recorded))
    return report


def run_grpc_replay(path: Path, target: str, **kwargs: Any) -> ReplayReport:
    try:
        return asyncio.run(replay_grpc_bundle(path, target, **kwargs))
    except BundleError as exc:
        raise ReplayError(str(exc)) from None
