"""MessageRelay: framing a byte stream into PostgreSQL messages, forwarding and rewriting them.

The relay must give exactly the same output whatever the chunking of its input, forward untouched
messages byte-identical (and without copying when it can), splice rewritten or dropped messages in
place, and refuse impossible or oversized lengths as soon as the length word is known.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.protocol.codec import ProtocolViolation, frame
from pgproxy.protocol.framing import HEADER_SIZE, MessageRelay, length_violation, startup_packet_length
from pgproxy.protocol.messages import (
    Bind,
    CommandComplete,
    DataRow,
    Execute,
    Parse,
    Query,
    RowDescription,
    Sync,
    Terminate,
)
from pgproxy.protocol.types import Backend, Frontend

MAX = 1 << 20

Q, P, B, E, S, D, X = (ord(c) for c in "QPBESDX")


class Recorder:
    """A handler that records what it sees and answers from a per-type table."""

    def __init__(self, answers: dict[int, bytes | None] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple[int, bytes]] = []
        self.views_ok = True

    def __call__(self, msg_type: int, body: memoryview) -> bytes | None:
        if not isinstance(body, memoryview):
            self.views_ok = False
        self.calls.append((msg_type, bytes(body)))
        return self.answers.get(msg_type)


def relay(interesting: str = "", answers: dict[int, bytes | None] | None = None,
          max_size: int = MAX) -> tuple[MessageRelay, Recorder]:
    rec = Recorder(answers)
    return MessageRelay.for_types(max_size, frozenset(interesting.encode()), rec), rec


def stream() -> list[bytes]:
    """A realistic extended-protocol client batch followed by a simple query and Terminate."""
    return [
        Parse("s1", "SELECT $1::int + 1", (23,)).encode(),
        Bind("", "s1", (0,), (b"41",), ()).encode(),
        Execute("", 0).encode(),
        Sync().encode(),
        Query("SELECT * FROM t; SELECT 2").encode(),
        Terminate().encode(),
    ]


def feed_chunks(r: MessageRelay, data: bytes, cuts: list[int]) -> bytes:
    """Feed ``data`` split at the (sorted, unique) offsets ``cuts``; return everything forwarded."""
    out = []
    prev = 0
    for cut in [*cuts, len(data)]:
        out.append(r.feed(data[prev:cut]))
        prev = cut
    return b"".join(out)


# --------------------------------------------------------------------------------------------------
# Pass-through


def test_whole_chunk_of_complete_messages_is_returned_as_the_same_object() -> None:
    data = b"".join(stream())
    r, rec = relay()
    out = r.feed(data)
    assert out is data
    assert r.buffered == 0
    assert rec.calls == []


def test_untouched_interesting_messages_still_return_the_same_object() -> None:
    data = b"".join(stream())
    r, rec = relay("QPBES")  # handler looks at them but returns None
    out = r.feed(data)
    assert out is data
    assert [t for t, _ in rec.calls] == [P, B, E, S, Q]


def test_trailing_partial_message_is_held_back() -> None:
    msgs = stream()
    data = b"".join(msgs)
    cut = len(data) - 3
    r, _ = relay()
    out = r.feed(data[:cut])
    assert out == b"".join(msgs[:-1])
    assert r.buffered == len(msgs[-1]) - 3
    assert r.feed(data[cut:]) == msgs[-1]
    assert r.buffered == 0


def test_incomplete_header_is_held_back() -> None:
    r, _ = relay()
    q = Query("SELECT 1").encode()
    for i in range(HEADER_SIZE):
        assert r.feed(q[i:i + 1]) == b""
        assert r.buffered == i + 1
    assert r.feed(q[HEADER_SIZE:]) == q


def test_empty_feed() -> None:
    r, _ = relay("Q")
    assert r.feed(b"") == b""
    assert r.feed(Query("x").encode()[:2]) == b""
    assert r.feed(b"") == b""
    assert r.buffered == 2


def test_message_with_empty_body() -> None:
    r, rec = relay("S")
    data = Sync().encode() + Sync().encode()
    assert r.feed(data) is data
    assert rec.calls == [(S, b""), (S, b"")]


def test_one_byte_at_a_time_equals_all_at_once() -> None:
    data = b"".join(stream())
    r, rec = relay("QE", {Q: Query("SELECT 'rewritten'").encode()})
    expected = r.feed(data)
    expected_calls = list(rec.calls)

    r2, rec2 = relay("QE", {Q: Query("SELECT 'rewritten'").encode()})
    out = b"".join(r2.feed(data[i:i + 1]) for i in range(len(data)))
    assert out == expected
    assert rec2.calls == expected_calls
    assert r2.buffered == 0
    assert Query("SELECT 'rewritten'").encode() in out


def test_every_single_split_point_gives_the_same_output() -> None:
    data = b"".join(stream())
    answers = {B: b"", Q: Query("SELECT 0").encode()}
    r, rec = relay("BQ", answers)
    expected = r.feed(data)
    for cut in range(len(data) + 1):
        r2, rec2 = relay("BQ", answers)
        assert feed_chunks(r2, data, [cut]) == expected, cut
        assert rec2.calls == rec.calls
        assert r2.buffered == 0


# A message of a random type (a printable letter) with a random body.
_messages = st.lists(
    st.tuples(st.sampled_from(b"QPBDECSdHXZ"), st.binary(max_size=40)), min_size=0, max_size=12
)


@settings(max_examples=300, deadline=None)
@given(messages=_messages, data=st.data())
def test_random_chunkings_give_identical_output(
    messages: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    encoded = [frame(t, body) for t, body in messages]
    stream_bytes = b"".join(encoded)
    # Rewrite Q (to a fixed message), drop X, look at but keep P; everything else bypasses the handler.
    answers: dict[int, bytes | None] = {Q: b"Zxxxx", X: b"", P: None}

    def transformed(t: int, whole: bytes) -> bytes:
        if t in answers and answers[t] is not None:
            return answers[t]  # type: ignore[return-value]
        return whole

    expected = b"".join(transformed(t, m) for (t, _), m in zip(messages, encoded, strict=True))
    expected_calls = [(t, body) for t, body in messages if t in answers]

    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream_bytes)), max_size=20))))
    r, rec = relay("QXP", answers)
    assert feed_chunks(r, stream_bytes, cuts) == expected
    assert rec.calls == expected_calls
    assert rec.views_ok
    assert r.buffered == 0


# --------------------------------------------------------------------------------------------------
# Rewriting and dropping


def test_rewrite_one_message_in_the_middle_of_a_chunk() -> None:
    before = Parse("", "SELECT 1").encode() + Bind("", "").encode()
    target = Execute("", 0).encode()
    after = Sync().encode() + Query("SELECT 2").encode()
    replacement = Execute("", 10).encode() + Execute("", 20).encode()  # may be longer than the original
    r, rec = relay("E", {E: replacement})
    out = r.feed(before + target + after)
    assert out == before + replacement + after
    assert rec.calls == [(E, target[HEADER_SIZE:])]


def test_rewrite_first_and_last_messages() -> None:
    first = Query("one").encode()
    middle = Sync().encode()
    last = Query("two").encode()
    r, _ = relay("Q", {Q: b"Q\x00\x00\x00\x05\x00"})
    assert r.feed(first + middle + last) == b"Q\x00\x00\x00\x05\x00" + middle + b"Q\x00\x00\x00\x05\x00"


def test_rewrite_with_trailing_partial_message() -> None:
    target = Query("rewrite me").encode()
    tail = Query("later").encode()
    r, _ = relay("Q", {Q: b"REPLACED"})
    out = r.feed(target + tail[:4])
    assert out == b"REPLACED"
    assert r.buffered == 4
    assert r.feed(tail[4:]) == b"REPLACED"


def test_drop_message() -> None:
    keep1 = Query("SELECT 1").encode()
    dropped = Terminate().encode()
    keep2 = Sync().encode()
    r, rec = relay("X", {X: b""})
    assert r.feed(keep1 + dropped + keep2) == keep1 + keep2
    assert rec.calls == [(X, b"")]


def test_drop_everything() -> None:
    r, _ = relay("Q", {Q: b""})
    assert r.feed(Query("a").encode() + Query("b").encode()) == b""


def test_selective_handler_rewrites_only_some_instances() -> None:
    def handler(msg_type: int, body: memoryview) -> bytes | None:
        return b"!" if bytes(body) == b"b\x00" else None

    a, b_, c = Query("a").encode(), Query("b").encode(), Query("c").encode()
    r = MessageRelay.for_types(MAX, frozenset(b"Q"), handler)
    assert r.feed(a + b_ + c) == a + b"!" + c


def test_handler_sees_type_and_body_memoryview() -> None:
    seen: list[tuple[int, memoryview, bytes]] = []

    def handler(msg_type: int, body: memoryview) -> bytes | None:
        seen.append((msg_type, body, bytes(body)))
        return None

    rows = [RowDescription(()).encode(), DataRow((b"1", None)).encode(), CommandComplete("SELECT 1").encode(),
            frame(Backend.READY_FOR_QUERY, b"I")]
    r = MessageRelay.for_types(MAX, frozenset(b"CZ"), handler)
    data = b"".join(rows)
    # Split inside the CommandComplete body so that it is reassembled from the pending buffer.
    cut = len(rows[0]) + len(rows[1]) + 7
    r.feed(data[:cut])
    r.feed(data[cut:])
    assert [(t, b) for t, _, b in seen] == [(ord("C"), b"SELECT 1\x00"), (ord("Z"), b"I")]
    for _, view, body in seen:
        assert isinstance(view, memoryview)
        assert len(view) == len(body)


# --------------------------------------------------------------------------------------------------
# Length limits


@pytest.mark.parametrize("length", [0, 1, 3])
def test_length_below_four_is_a_protocol_violation(length: int) -> None:
    r, _ = relay()
    header = b"Q" + length.to_bytes(4, "big")
    with pytest.raises(ProtocolViolation) as exc:
        r.feed(header)
    assert exc.value.sqlstate == "08P01"
    assert r.buffered == 0


def test_negative_length_is_a_protocol_violation() -> None:
    # The length word is an Int32: 0xFFFFFFFF is -1, an impossible length (PostgreSQL's pq_getmessage
    # reports "invalid message length", 08P01), not a 4 GiB message over the size limit.
    r, _ = relay()
    with pytest.raises(ProtocolViolation) as exc:
        r.feed(b"Q\xff\xff\xff\xff")
    assert exc.value.sqlstate == "08P01"


def test_invalid_length_after_valid_messages_in_the_same_chunk() -> None:
    r, _ = relay()
    with pytest.raises(ProtocolViolation) as exc:
        r.feed(Sync().encode() + b"Q\x00\x00\x00\x02")
    assert exc.value.sqlstate == "08P01"


def test_length_exactly_at_the_limit_is_accepted() -> None:
    max_size = 64
    body = b"x" * (max_size - 4)
    m = frame(Frontend.COPY_DATA, body)
    r, _ = relay(max_size=max_size)
    assert r.feed(m) is m


def test_length_over_limit_raises_from_the_header_alone() -> None:
    max_size = 64
    r, _ = relay(max_size=max_size)
    header = b"d" + (max_size + 1).to_bytes(4, "big")
    with pytest.raises(ProtocolViolation) as exc:
        r.feed(header)
    assert exc.value.sqlstate == "54000"
    assert str(max_size) in str(exc.value)


def test_huge_declared_length_raises_before_buffering_the_body() -> None:
    max_size = 1024
    r, _ = relay(max_size=max_size)
    header = b"d" + (0x7FFFFFFF).to_bytes(4, "big")
    # The header arrives in two pieces: nothing can be checked until the length word is complete.
    assert r.feed(header[:3]) == b""
    assert r.buffered == 3
    with pytest.raises(ProtocolViolation) as exc:
        r.feed(header[3:] + b"y" * 100)
    assert exc.value.sqlstate == "54000"


def test_oversized_message_after_a_pending_one() -> None:
    max_size = 256
    r, _ = relay(max_size=max_size)
    ok = Query("SELECT 1").encode()
    assert r.feed(ok[:6]) == b""
    with pytest.raises(ProtocolViolation) as exc:
        r.feed(ok[6:] + b"d" + (max_size + 1).to_bytes(4, "big"))
    assert exc.value.sqlstate == "54000"


def test_length_violation_helper() -> None:
    assert length_violation(Q, 3, 100).sqlstate == "08P01"
    assert length_violation(Q, 101, 100).sqlstate == "54000"


def test_startup_packet_length() -> None:
    assert startup_packet_length((8).to_bytes(4, "big"), 10000) == 8
    assert startup_packet_length((10000).to_bytes(4, "big") + b"rest", 10000) == 10000
    for bad in (0, 7, 10001):
        with pytest.raises(ProtocolViolation):
            startup_packet_length(bad.to_bytes(4, "big"), 10000)


# --------------------------------------------------------------------------------------------------
# Large messages


@pytest.mark.timeout(30)
def test_huge_message_in_many_chunks_is_assembled_once() -> None:
    body = bytes(range(256)) * (8 * 1024 * 1024 // 256)  # 8 MiB
    big = frame(Frontend.COPY_DATA, body)
    trailer = frame(Backend.READY_FOR_QUERY, b"I")
    data = big + trailer
    chunk = 64 * 1024
    r, rec = relay("dZ", max_size=16 * 1024 * 1024)
    outputs = []
    for i in range(0, len(data), chunk):
        outputs.append(r.feed(data[i:i + chunk]))
    # Nothing is forwarded until the message is complete; then it is forwarded whole, once.
    assert all(o == b"" for o in outputs[:-1])
    assert b"".join(outputs) == data
    assert [t for t, _ in rec.calls] == [ord("d"), ord("Z")]
    assert rec.calls[0][1] == body
    assert r.buffered == 0


@pytest.mark.timeout(30)
def test_buffered_grows_linearly_while_waiting_for_a_huge_message() -> None:
    body_len = 4 * 1024 * 1024
    header = b"d" + (body_len + 4).to_bytes(4, "big")
    r, rec = relay("d", max_size=8 * 1024 * 1024)
    assert r.feed(header) == b""
    chunk = b"z" * 65536
    for i in range(body_len // len(chunk) - 1):
        assert r.feed(chunk) == b""
        assert r.buffered == HEADER_SIZE + (i + 1) * len(chunk)
    assert rec.calls == []
    out = r.feed(chunk)
    assert len(out) == HEADER_SIZE + body_len
    assert len(rec.calls) == 1
