"""uvicorn's httptools protocol with a bound on a request's head (its line and headers), which
httptools reads whole however long (one 100 MB header took the API 200 MB of memory), and its
refusals in the one error envelope. `latentd api` serves with it; where httptools is missing it
serves with h11, which keeps a bound of its own (16 KiB) and refuses in plain text.

It subclasses uvicorn's protocol and so leans on its method names and its `cycle` and `transport`
attributes: uvicorn is pinned in requirements/api.txt, and tests/test_failures.py drives this
through a real `latentd api`."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import get_settings
from app.errors import ErrorBody, ErrorResponse
from latentd.contract import ErrorCode

# The most a request's line and headers may take together. nginx's default is 32 KiB.
MAX_HEAD_BYTES = 64 * 1024
# How long a refused connection is read from (and what it sends dropped) before it is closed.
LINGER_S = 5.0


def _refusal(status: str, code: ErrorCode, message: str) -> bytes:
    """A response in the error envelope, written before any app code runs."""
    body = ErrorResponse(error=ErrorBody(code=code.value, message=message)).model_dump_json().encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Refuses with 431 a head that passes MAX_HEAD_BYTES. While a head is read, a read counts
    whole toward it only if the head began in an earlier read: one that also carried earlier
    requests (pipelined) is not counted, so memory stays within the bound plus two reads. A head
    read whole is measured as it ends, by its line and headers as parsed, before the request is
    handed on: one that came in a single read (up to 256 KiB here) was never counted."""

    _head: int | None = 0  # bytes received of the head being read; None once it is read
    _began = False  # a head began during the read being parsed
    _refused = False
    # A connection that sends nothing, or a request that comes a byte at a time, is closed once
    # LATENTD_REQUEST_READ_TIMEOUT passes: uvicorn times out only the wait between requests, and
    # 20,000 such connections took every file descriptor the API had.
    _read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_from_now()

    def connection_lost(self, exc: Exception | None) -> None:
        self._read_done()
        super().connection_lost(exc)

    def _read_from_now(self) -> None:
        self._read_done()
        self._read_deadline = self.loop.call_later(get_settings().request_read_timeout, self._read_too_slow)

    def _read_done(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_too_slow(self) -> None:
        self._read_deadline = None
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = 0
        self._began = True
        self._read_from_now()
        # A held read's way to tell its client hung up (app.serving.hung_up).
        extensions: dict[str, object] = self.scope.setdefault("extensions", {})  # type: ignore[assignment]
        extensions["latentd.gone"] = self.transport.is_closing

    def on_headers_complete(self) -> None:
        self._head = None
        if self._refused:
            return
        if len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > MAX_HEAD_BYTES:
            self._refuse()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._read_done()
        if not self._refused:
            super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # dropped: the client has its answer and may still be sending
        if self._read_deadline is None and (self.cycle is None or self.cycle.response_complete):
            # Bytes between requests (a bare CRLF, which begins no message) stop uvicorn's
            # keep-alive timer: the connection was then held for good.
            self._read_from_now()
        self._began = False
        super().data_received(data)
        if self._head is None or self._began or self.transport.is_closing():
            return
        self._head += len(data)
        if self._head > MAX_HEAD_BYTES:
            self._refuse()

    def _refuse(self) -> None:
        self._refused = True
        self._read_done()  # the linger below closes it, after the answer
        if self.cycle is not None and not self.cycle.response_complete:
            # An earlier request of this connection (pipelined) is still being answered, and an
            # answer now would come before its own: the connection is closed instead.
            self.transport.close()
            return
        message = f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"
        self.transport.write(
            _refusal("431 Request Header Fields Too Large", ErrorCode.HEADERS_TOO_LARGE, message)
        )
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # Closed at once, with the client's bytes unread, the connection would be reset, and a
        # reset can reach the client before the answer. So: the answer, the end of what is sent,
        # and the connection closed when the client closes it, or after LINGER_S.
        self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _should_upgrade(self) -> bool:
        # A refused head is not upgraded: uvicorn's upgrade of a WebSocket request whose head was
        # refused (no scope method) logged a traceback per request.
        return not self._refused and super()._should_upgrade()

    def _unsupported_upgrade_warning(self) -> None:
        if not self._refused:
            super()._unsupported_upgrade_warning()

    def send_400_response(self, msg: str) -> None:
        """A request HTTP itself cannot read (a control character in a header, an unknown method,
        a malformed Content-Length): the error envelope, where uvicorn answers in plain text."""
        message = "the request is not valid HTTP/1.1; check its request line and headers"
        self.transport.write(_refusal("400 Bad Request", ErrorCode.INVALID_REQUEST, message))
        self.transport.close()
