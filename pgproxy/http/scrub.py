"""Keep the injected credential from reaching the caller when an upstream echoes it back.

``Scrubber`` replaces every occurrence of the secret strings in a streamed body with ``*`` of the same
length (so ``Content-Length`` stays true), holding back just enough bytes between chunks to catch a
secret split across two of them. Sans-I/O; used for response bodies and header values.
"""

from __future__ import annotations

from collections.abc import Iterable


class Scrubber:
    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret containing another is replaced whole.
        self.secrets = tuple(sorted({s.encode() for s in secrets if s}, key=len, reverse=True))
        self._keep = max((len(s) for s in self.secrets), default=1) - 1
        self._tail = b""
        self.replaced = 0  # how many occurrences were starred out

    def fresh(self) -> Scrubber:
        """A new scrubber for the same secrets: one per response, without sorting the secrets again."""
        clone = object.__new__(Scrubber)
        clone.secrets, clone._keep, clone._tail, clone.replaced = self.secrets, self._keep, b"", 0
        return clone

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def _replace(self, data: bytes) -> bytes:
        for secret in self.secrets:
            if secret in data:
                self.replaced += data.count(secret)
                data = data.replace(secret, b"*" * len(secret))
        return data

    def feed(self, chunk: bytes) -> bytes | memoryview:
        """Scrubbed bytes that are safe to send now (the last few may be held back).

        Copies the chunk at most once (joining the held-back tail); what is sent is a view of it.
        """
        if not self.secrets:
            return chunk
        data = self._replace(self._tail + chunk if self._tail else chunk)
        if self._keep == 0:
            self._tail = b""
            return data
        cut = max(0, len(data) - self._keep)
        self._tail = data[cut:]
        return memoryview(data)[:cut]

    def whole(self, body: bytes) -> bytes:
        """A complete body, scrubbed at once (for bodies read whole rather than streamed)."""
        return self._replace(body) if self.secrets else body

    def finish(self) -> bytes:
        tail, self._tail = self._tail, b""
        return self._replace(tail)

    def text(self, value: str) -> str:
        """A header value with every secret starred out."""
        return self._replace(value.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
