"""CRLF line channel for an SMTP session over a plain socket or a pyOpenSSL connection.

API:
  ``Channel(sock, timeout, preset=None)``: takes over ``sock`` (``preset``: kernel timeouts it already has,
     see ``set_kernel_timeouts``). A plain socket stays blocking with SO_RCVTIMEO/SO_SNDTIMEO
     bounding each system call (one recv per read, no poll); under TLS, or where those options cannot be
     set, the socket is non-blocking and every wait is a poll up to a deadline.
  ``readline(limit) -> bytes``: one line with its terminator (CRLF or a bare LF). Command lines: ``COMMAND_LIMIT``.
  ``read_data(sink_write, max_size, bare_newline) -> DataResult``: a DATA body up to ``<CRLF>.<CRLF>``,
     dot-unstuffed, streamed to ``sink_write`` in chunks.
  ``write(data)`` buffers; ``flush()`` sends everything; ``has_pending_input()`` tells the server whether a
     complete line is already buffered, so a pipelined batch of replies goes out with one flush (RFC 2920).
  ``start_tls(context)``: flushes pending output, drops buffered plaintext input, handshakes as server;
     then ``tls`` holds e.g. ``"TLSv1.3 TLS_AES_256_GCM_SHA384"`` (None before).
  ``close()``: best-effort TLS close_notify, then the socket is closed; unflushed output is dropped.
Invariants:
  - Only ``<CRLF>.<CRLF>`` ends DATA; a bare LF or CR never does (SMTP smuggling). Lines are dot-unstuffed only
    after a CRLF, and a dot followed by a lone LF or CR is kept as data. With ``bare_newline="normalize"`` a
    lone LF or CR is stored as CRLF, with ``"reject"`` the body is stored as received and only flagged.
  - Memory is bounded for any input: a line longer than its limit is discarded up to its LF, a DATA body goes
    to ``sink_write`` as it arrives, and beyond ``max_size`` nothing is stored while the body is still read to
    its end so the session stays usable.
  - Plaintext that arrived after STARTTLS is never read as a command over TLS (the CVE-2011-0411 class).
  - Every read and write waits at most ``timeout`` seconds: readline and flush per call, DATA per read.
Threading: one channel per session thread; no locking inside.
Errors: ``ChannelClosed`` (EOF, reset, TLS failure), ``ChannelTimeout``, ``LineTooLong``; all are ``ChannelError``.
  A failing ``sink_write`` does not abort the body: the exception is kept in ``DataResult.sink_error``.
"""

import logging
import math
import re
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Union

from OpenSSL import SSL

from pmaster.tls import tls_description

log = logging.getLogger("pmaster.channel")

COMMAND_LIMIT = 2048  # SPEC 4: command lines up to 2048 octets with CRLF, as Postfix allows
NORMALIZE = "normalize"
REJECT = "reject"

_RECV_SIZE = 65536
_TLS_SEND_SIZE = 16384  # one TLS record
_CRLF_DOT = b"\r\n."
_END_AFTER_CRLF = b".\r\n"
_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")
_FIELD_NAME = re.compile(rb"[!-9;-~]+:")
_HEADER_PREFIX = 128  # bytes of each header line kept to classify it
_HAVE_POLL = hasattr(select, "poll")
_TIMEO_SLACK = 0.05  # seconds a kernel-side timeout may differ from the time left before it is set again


class ChannelError(Exception):
    """The channel cannot go on as asked; see the subclasses."""


class ChannelClosed(ChannelError):
    """The peer closed the connection, reset it, or TLS failed."""


class ChannelTimeout(ChannelError):
    """Nothing arrived (or could be sent) within the timeout."""


class LineTooLong(ChannelError):
    """A line exceeded its limit; the rest of it up to its LF was discarded, the next line is readable."""


@dataclass
class DataResult:
    size: int = 0  # body octets after unstuffing (and normalising), stored or only seen
    too_big: bool = False  # size exceeded max_size: nothing beyond it was stored
    bare_newline_seen: bool = False
    received_headers: int = 0  # "Received:" lines in the header block
    sink_error: Optional[BaseException] = None  # sink_write failed: nothing after it was stored


class Channel:
    """Buffered line reader and writer over a socket, upgradable to TLS in place."""

    def __init__(self, sock: socket.socket, timeout: float, preset: Optional[float] = None):
        if timeout is None or timeout <= 0:
            raise ValueError("a channel needs a positive timeout")
        self.sock = sock
        self.timeout = timeout
        self.tls: Optional[str] = None
        self._conn: Union[socket.socket, SSL.Connection] = sock
        self._ssl: Optional[SSL.Connection] = None
        self._in = bytearray()
        self._out = bytearray()
        self.closed = False
        # Each GIL-releasing system call costs thread hand-offs in a busy daemon, so a plain socket is kept
        # blocking and the kernel bounds every recv/send (SO_RCVTIMEO/SO_SNDTIMEO): one system call per read
        # instead of recv, EAGAIN, poll, recv. The per-call deadline is kept by shrinking the kernel timeout
        # to the time left when a call needs a second read. pyOpenSSL (after STARTTLS) sees only the fd:
        # there the socket is non-blocking and every wait is a poll up to the deadline.
        self._blocking = False
        self._timeo = {socket.SO_RCVTIMEO: 0.0, socket.SO_SNDTIMEO: 0.0}
        try:
            if preset is not None and abs(preset - timeout) <= _TIMEO_SLACK:
                # Inherited from the listening socket (``set_kernel_timeouts``): nothing to set.
                self._timeo = {socket.SO_RCVTIMEO: preset, socket.SO_SNDTIMEO: preset}
            else:
                self._set_timeo(socket.SO_RCVTIMEO, timeout)
                self._set_timeo(socket.SO_SNDTIMEO, timeout)
            if sock.gettimeout() is not None:
                sock.setblocking(True)
            self._blocking = True
        except (OSError, struct.error, AttributeError):
            sock.setblocking(False)

    # ----- reading lines

    def readline(self, limit: int = COMMAND_LIMIT) -> bytes:
        """Return one line including its LF; raise LineTooLong when it has more than ``limit`` octets."""
        deadline = time.monotonic() + self.timeout
        buf = self._in
        scanned = 0
        while True:
            nl = buf.find(b"\n", scanned)
            if nl >= 0:
                line = bytes(buf[:nl + 1])
                del buf[:nl + 1]
                if len(line) > limit:
                    raise LineTooLong("line of %d octets exceeds %d" % (len(line), limit))
                return line
            if len(buf) > limit:
                self._discard_line(deadline)
                raise LineTooLong("line exceeds %d octets" % limit)
            scanned = len(buf)
            buf += self._recv(deadline)

    def has_pending_input(self) -> bool:
        """True when a complete line is buffered: the server should answer it before flushing."""
        return b"\n" in self._in

    def _discard_line(self, deadline: float) -> None:
        buf = self._in
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                del buf[:nl + 1]
                return
            del buf[:]
            buf += self._recv(deadline)

    # ----- reading a DATA body

    def read_data(self, sink_write: Callable[[bytes], object], max_size: Optional[int],
                  bare_newline: str = NORMALIZE) -> DataResult:
        """Read a message body up to ``<CRLF>.<CRLF>``; ``max_size`` None or 0 means unlimited."""
        if bare_newline not in (NORMALIZE, REJECT):
            raise ValueError("bare_newline must be %r or %r" % (NORMALIZE, REJECT))
        body = _BodyWriter(sink_write, max_size or 0, bare_newline == NORMALIZE)
        buf = self._in
        at_line_start = True  # the DATA command's CRLF came just before
        while True:
            pos, at_line_start, done = _scan_body(buf, at_line_start, body)
            del buf[:pos]
            body.flush()
            if done:
                return body.result()
            buf += self._recv(time.monotonic() + self.timeout)

    # ----- writing

    def write(self, data: bytes) -> None:
        self._out += data

    def flush(self) -> None:
        """Send everything written so far; raises ChannelClosed or ChannelTimeout."""
        if not self._out:
            return
        data = memoryview(bytes(self._out))  # immutable: a TLS retry must see the same buffer
        del self._out[:]
        deadline = time.monotonic() + self.timeout
        sent = 0
        while sent < len(data):
            step = _TLS_SEND_SIZE if self._ssl is not None else len(data)
            sent += self._send(data[sent:sent + step], deadline)

    # ----- TLS and closing

    def start_tls(self, context: SSL.Context) -> None:
        """Handshake as TLS server; plaintext already buffered (sent after STARTTLS) is thrown away."""
        if self._ssl is not None:
            raise ChannelError("TLS already active")
        self.flush()
        if self._in:
            log.info("discarding %d octets of plaintext sent after STARTTLS", len(self._in))
        del self._in[:]
        if self._blocking:
            self.sock.setblocking(False)
            self._blocking = False
        conn = SSL.Connection(context, self.sock)
        conn.set_accept_state()
        self._ssl = conn
        self._conn = conn
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                self._wait(False, deadline)
            except SSL.WantWriteError:
                self._wait(True, deadline)
            except (SSL.Error, OSError) as exc:
                raise ChannelClosed("TLS handshake failed: %s" % _describe(exc)) from None
        self.tls = tls_description(conn)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._ssl is not None:
            try:
                self._ssl.shutdown()  # one try at close_notify; the peer's answer is not awaited
            except (SSL.Error, OSError):
                pass
        try:
            self.sock.close()
        except OSError:
            pass

    # ----- transport

    def _recv(self, deadline: float) -> bytes:
        if self._blocking:
            return self._recv_blocking(deadline)
        while True:
            try:
                data = self._conn.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError, SSL.WantReadError):
                self._wait(False, deadline)
                continue
            except SSL.WantWriteError:
                self._wait(True, deadline)
                continue
            except SSL.ZeroReturnError:
                raise ChannelClosed("connection closed by peer") from None
            except (SSL.Error, OSError) as exc:
                raise ChannelClosed(_describe(exc)) from None
            if not data:
                raise ChannelClosed("connection closed by peer")
            return data

    def _send(self, chunk: memoryview, deadline: float) -> int:
        if self._blocking:
            return self._send_blocking(chunk, deadline)
        while True:
            try:
                return self._conn.send(chunk)
            except (BlockingIOError, InterruptedError, SSL.WantWriteError):
                self._wait(True, deadline)
            except SSL.WantReadError:
                self._wait(False, deadline)
            except (SSL.Error, OSError) as exc:
                raise ChannelClosed(_describe(exc)) from None

    def _recv_blocking(self, deadline: float) -> bytes:
        while True:
            self._arm(socket.SO_RCVTIMEO, deadline)
            try:
                data = self.sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                continue  # the kernel timeout expired: _arm raises if the deadline has passed
            except OSError as exc:
                raise ChannelClosed(_describe(exc)) from None
            if not data:
                raise ChannelClosed("connection closed by peer")
            return data

    def _send_blocking(self, chunk: memoryview, deadline: float) -> int:
        while True:
            self._arm(socket.SO_SNDTIMEO, deadline)
            try:
                return self.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise ChannelClosed(_describe(exc)) from None

    def _arm(self, option: int, deadline: float) -> None:
        """Make the kernel timeout of ``option`` end near ``deadline``; raise ChannelTimeout once it has passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ChannelTimeout("timeout after %gs" % self.timeout)
        if abs(self._timeo[option] - remaining) > _TIMEO_SLACK:
            try:
                self._set_timeo(option, remaining)
            except OSError as exc:
                raise ChannelClosed(_describe(exc)) from None

    def _set_timeo(self, option: int, seconds: float) -> None:
        self._timeo[option] = _setsockopt_timeo(self.sock, option, seconds)

    def _wait(self, for_write: bool, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ChannelTimeout("timeout after %gs" % self.timeout)
        fd = self.sock.fileno()
        if fd < 0:
            raise ChannelClosed("socket closed")
        if _HAVE_POLL:
            # poll, not select: a busy daemon has descriptors beyond FD_SETSIZE
            poller = select.poll()
            poller.register(fd, select.POLLOUT if for_write else select.POLLIN)
            ready = poller.poll(math.ceil(remaining * 1000))
        else:  # pragma: no cover - platforms without poll
            rlist, wlist, _ = select.select([] if for_write else [fd], [fd] if for_write else [], [], remaining)
            ready = rlist or wlist
        if not ready:
            raise ChannelTimeout("timeout after %gs" % self.timeout)


def _setsockopt_timeo(sock: socket.socket, option: int, seconds: float) -> float:
    # struct timeval; a zero timeout would mean "wait forever", so never less than a millisecond
    usec = max(1000, int(seconds * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", usec // 1000000, usec % 1000000))
    return usec / 1e6


def set_kernel_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """SO_RCVTIMEO or SO_SNDTIMEO of ``sock`` (a blocking socket then fails with EAGAIN after it)."""
    _setsockopt_timeo(sock, option, seconds)


def set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO and SO_SNDTIMEO of ``sock``; on a listening socket (Linux) accepted sockets inherit them,
    and a ``Channel`` given ``preset=seconds`` then sets none of its own."""
    for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        _setsockopt_timeo(sock, option, seconds)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SSL.SysCallError):
        return "connection lost (%s)" % (exc.args[1] if len(exc.args) > 1 else exc)
    return str(exc) or exc.__class__.__name__


def _scan_body(buf: bytearray, at_line_start: bool, body: "_BodyWriter"):
    """Consume what can be decided in ``buf``; return (consumed, at_line_start, end_seen).

    Only two places need a decision: the start of a line after CRLF (a dot there is stuffing, or with
    CRLF the end) and everything else, which goes out in whole segments up to the next ``CRLF .``.
    A tail that may begin ``CRLF .`` (or a lone trailing CR) waits for more input.
    """
    pos = 0
    n = len(buf)
    while pos < n:
        if at_line_start:
            if buf[pos] == 0x2E:  # "."
                head = bytes(buf[pos:pos + 3])
                if head == _END_AFTER_CRLF:
                    return pos + 3, True, True
                if len(head) < 3 and _END_AFTER_CRLF.startswith(head):
                    return pos, True, False  # "." or ".\r": undecided
                if head[1:2] not in (b"\r", b"\n"):
                    pos += 1  # RFC 5321 4.5.2: drop the stuffed dot
                # else ".<LF>" or ".<CR>x": not the end (smuggling) and no stuffing either: keep the dot
            at_line_start = False
            continue
        k = buf.find(_CRLF_DOT, pos)
        if k >= 0:
            body.add(buf[pos:k + 2])
            pos = k + 2
            at_line_start = True
            continue
        end = n
        if buf.endswith(b"\r\n"):
            end = n - 2
        elif buf.endswith(b"\r"):
            end = n - 1
        if end > pos:
            body.add(buf[pos:end])
        return max(pos, end), False, False
    return pos, at_line_start, False


class _BodyWriter:
    """Sizes, checks and normalises body segments and hands them to the sink in one write per read."""

    def __init__(self, sink_write: Callable[[bytes], object], max_size: int, normalize: bool):
        self._sink = sink_write
        self._max = max_size
        self._normalize = normalize
        self._pending: List[bytes] = []
        self._headers = _HeaderCounter()
        self._res = DataResult()

    def add(self, seg: Union[bytes, bytearray]) -> None:
        cr = seg.count(b"\r")
        lf = seg.count(b"\n")
        if cr or lf:
            crlf = seg.count(b"\r\n")
            if cr != crlf or lf != crlf:
                # A segment never ends in a CR whose LF is still to come, so the counts are exact.
                self._res.bare_newline_seen = True
                if self._normalize:
                    seg = _ANY_NEWLINE.sub(b"\r\n", seg)
        res = self._res
        self._headers.feed(seg)
        if self._max and not res.too_big and res.size + len(seg) > self._max:
            res.too_big = True
            self._pending = []
        res.size += len(seg)
        if not res.too_big and res.sink_error is None:
            self._pending.append(bytes(seg))

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending = []
        try:
            self._sink(data)
        except Exception as exc:  # keep reading to the final dot: the session must stay usable (SPEC 4)
            log.debug("sink failed: %s", exc)
            self._res.sink_error = exc

    def result(self) -> DataResult:
        self._res.received_headers = self._headers.count
        return self._res


class _HeaderCounter:
    """Counts ``Received:`` lines in the header block; stops at the first line that is not a header."""

    def __init__(self) -> None:
        self.count = 0
        self.done = False
        self._line = b""  # the first _HEADER_PREFIX octets of the current line

    def feed(self, data: Union[bytes, bytearray]) -> None:
        pos = 0
        n = len(data)
        while not self.done and pos < n:
            nl = data.find(b"\n", pos)
            stop = n if nl < 0 else nl
            if len(self._line) < _HEADER_PREFIX:
                self._line += bytes(data[pos:min(stop, pos + _HEADER_PREFIX - len(self._line))])
            if nl < 0:
                return
            self._end_line()
            pos = nl + 1

    def _end_line(self) -> None:
        line = self._line
        self._line = b""
        if line in (b"", b"\r"):
            self.done = True  # the empty line: the body begins
        elif line[:1] in (b" ", b"\t"):
            pass  # continuation of a folded header
        elif line[:9].lower() == b"received:":
            self.count += 1
        elif not _is_header_start(line):
            self.done = True  # no header block at all, or it ended without an empty line


def _is_header_start(line: bytes) -> bool:
    # RFC 5322 2.2: field names are printable US-ASCII without colon or space
    return _FIELD_NAME.match(line) is not None
