"""`pgproxy audit replay-http`: re-send a verified bundle's HTTP exchanges to a sandbox and compare digests.

Only exchanges whose request can be rebuilt exactly are sent: the stored body excerpt must hash to
the recorded request digest (a masked, redacted or truncated body cannot, and is skipped with the
reason). Each answer is compared on status and on the SHA-256 of its body against what the upstream
sent when recorded (``upstream_sha256`` when the proxy changed the body for the caller, else
``sha256``). The sandbox gets no credential from the proxy: pass its own with ``headers``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from ..audit.bundle import BundleError, verify_bundle
from ..audit.replay import ReplayError, ReplayOutcome, ReplayReport

CHUNK = 64 * 1024


def rebuild_body(record: Mapping[str, Any]) -> bytes | None:
    """The exact request body from its audit record, or None when the record cannot reproduce it."""
    size, digest = record.get("bytes"), record.get("sha256")
    if size == 0:
        return b""
    candidates: list[bytes] = []
    if isinstance(record.get("text"), str) and not record.get("truncated"):
        candidates.append(record["text"].encode("utf-8"))
    if "json" in record:
        value = record["json"]
        for separators in ((", ", ": "), (",", ":")):
            candidates.append(json.dumps(value, separators=separators, ensure_ascii=False).encode("utf-8"))
            candidates.append(json.dumps(value, separators=separators).encode("utf-8"))
    for body in candidates:
        if len(body) == size and hashlib.sha256(body).hexdigest() == digest:
            return body
    return None


def skip_reason(event: Mapping[str, Any]) -> str | None:
    response = event.get("response")
    if not isinstance(response, dict):
        return "no upstream response was recorded (refused by the proxy or the upstream failed)"
    if event.get("error"):
        return "the response was cut short when recorded"
    if (response.get("body") or {}).get("credential_scrubbed"):
        return "the response echoed the proxy's credential (starred out when recorded)"
    path = event.get("path")
    if not isinstance(path, str) or "[redacted:" in path:
        return "the path holds redacted secrets"
    body = (event.get("request") or {}).get("body") or {}
    if rebuild_body(body) is None:
        return "the request body cannot be rebuilt from the record (masked, redacted, truncated or binary)"
    return None


async def _replay_one(session: aiohttp.ClientSession, base_url: str, event: Mapping[str, Any],
                      headers: Mapping[str, str]) -> ReplayOutcome:
    index = int(event["index"])
    label = f"{event.get('target')}: {event.get('method')} {event.get('path')}"
    reason = skip_reason(event)
    if reason is not None:
        return ReplayOutcome(index, label, "skipped", reason)
    request = event["request"]
    body = rebuild_body(request["body"])
    sent_headers = dict(headers)
    content_type = (request.get("headers") or {}).get("content-type")
    if content_type and "content-type" not in {k.lower() for k in sent_headers}:
        sent_headers["Content-Type"] = content_type
    sent_headers.setdefault("Accept-Encoding", "identity")
    url = URL(base_url.rstrip("/") + str(event["path"]), encoded=True)
    digest = hashlib.sha256()
    try:
        async with session.request(str(event["method"]), url, data=body or None, headers=sent_headers,
                                   allow_redirects=False) as answer:
            async for chunk in answer.content.iter_chunked(CHUNK):
                digest.update(chunk)
            status = answer.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return ReplayOutcome(index, label, "differ", f"request failed: {type(exc).__name__}: {exc}")
    recorded = event["response"]
    recorded_body = recorded.get("body") or {}
    expected = recorded_body.get("upstream_sha256") or recorded_body.get("sha256")
    differences = []
    if status != recorded.get("status"):
        differences.append(f"status {status} (recorded {recorded.get('status')})")
    if digest.hexdigest() != expected:
        differences.append(f"body digest {digest.hexdigest()[:16]}... (recorded {str(expected)[:16]}...)")
    if differences:
        return ReplayOutcome(index, label, "differ", "; ".join(differences))
    return ReplayOutcome(index, label, "match", f"status {status}")


async def replay_http_bundle(path: Path, base_url: str, *, headers: Mapping[str, str] | None = None,
                             pubkeys: tuple[Path, ...] = (), timeout: float = 30.0,
                             progress: Callable[[ReplayOutcome, int, int], None] | None = None) -> ReplayReport:
    checked = verify_bundle(path, pubkeys=pubkeys)
    if not checked.ok:
        raise ReplayError(f"the bundle does not verify: {checked.problems[0]}")
    exchanges = [e for e in checked.events if e.get("event") == "http_exchange"]
    if not exchanges:
        raise ReplayError("the bundle holds no HTTP exchanges")
    report = ReplayReport()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), trust_env=False) as session:
        for n, event in enumerate(exchanges, 1):
            outcome = await _replay_one(session, base_url, event, headers or {})
            report.outcomes.append(outcome)
            if progress is not None:
                progress(outcome, n, len(exchanges))
    return report


def run_http_replay(path: Path, base_url: str, **kwargs: Any) -> ReplayReport:
    try:
        return asyncio.run(replay_http_bundle(path, base_url, **kwargs))
    except BundleError as exc:
        raise ReplayError(str(exc)) from None
