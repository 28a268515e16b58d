"""uvicorn's httptools protocol with a bound on a request's head (its line and headers), which
httptools reads whole however long (one 100 MB header took the API 200 MB of memory), its
refusals in the one error envelope, and requests that offer to switch protocols answered as
HTTP/1.1 requests, body and all. `latentd api` serves with it; where httptools is missing it
serves with h11, which keeps a bound of its own (16 KiB) and refuses in plain text.

It subclasses uvicorn's protocol and so leans on its method names and its `cycle` and `transport`
attributes: uvicorn is pinned in requirements/api.txt, and tests/test_failures.py drives this
through a real `latentd api`."""

from __future__ import annotations

import asyncio
import contextlib

import httptools
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
    # The head of a request that offered to switch protocols, without the offer (see `_feed`).
    _offer: bytes | None = None
    _rereading = False  # that head is being read again: its read deadline runs on
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
        if self._rereading:
            self._rereading = False
        else:
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
        if self.parser.should_upgrade() and self.parser.get_method() != b"CONNECT":
            self._offer = self._head_without_offer()
            return  # answered once it is read again, body and all
        super().on_headers_complete()

    def _head_without_offer(self) -> bytes:
        """The request's head without its offer to switch protocols: its Upgrade header, and the
        `upgrade` token of Connection. Every other header stays as it came, those that Connection
        names too (Content-Length there would otherwise go, and the body be read as a request)."""
        version = self.parser.get_http_version().encode()
        lines = [self.parser.get_method() + b" " + self.url + b" HTTP/" + version]
        for name, value in self.headers:
            if name == b"connection":
                value = b", ".join(t.strip() for t in value.split(b",") if t.strip().lower() != b"upgrade")
            if name != b"upgrade" and (value or name != b"connection"):
                lines.append(name + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._offer is not None:
            return  # its body is still to come (`_feed`)
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
        self._feed(data)
        if self._head is None or self._began or self.transport.is_closing():
            return
        self._head += len(data)
        if self._head > MAX_HEAD_BYTES:
            self._refuse()

    def _feed(self, data: bytes) -> None:
        """uvicorn's `data_received`, but for a request that offers to switch protocols (`Upgrade:
        h2c`, which Java's HttpClient sends with every request to an http:// URL, and `curl
        --http2`; or a WebSocket's): this API speaks HTTP/1.1 only, and answers such a request as
        the plain request it also is (RFC 9110, 7.8). httptools ends the request at its head and
        takes what follows for the new protocol's: the body was lost (`422`, body missing), or
        read as the next request (`400`). The head is read again without the offer, and what
        followed it after."""
        self._unset_keepalive_if_required()
        chunks: list[bytes | memoryview] = [data]
        while chunks:  # past an offer: its head again, then what followed it (more offers, pipelined)
            chunk = chunks.pop(0)
            try:
                self.parser.feed_data(chunk)
            except httptools.HttpParserError:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
                return
            except httptools.HttpParserUpgrade as upgrade:
                if self._offer is None:  # a CONNECT, or a refused head: answered
                    return
                head, self._offer = self._offer, None
                self.parser = httptools.HttpRequestParser(self)
                # As uvicorn's own: a request that closes the connection is answered, and what
                # came after it dropped (not a 400 for it, before its answer).
                with contextlib.suppress(AttributeError):  # httptools before 0.6.3
                    self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
                self._rereading = True
                chunks = [head, memoryview(chunk)[upgrade.args[0] :]]

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

    def send_400_response(self, msg: str) -> None:
        """A request HTTP itself cannot read (a control character in a header, an unknown method,
        a malformed Content-Length): the error envelope, where uvicorn answers in plain text."""
        message = "the request is not valid HTTP/1.1; check its request line and headers"
        self.transport.write(_refusal("400 Bad Request", ErrorCode.INVALID_REQUEST, message))
        self.transport.close()
