"""A small HTTP server for the metrics endpoint whose threads and connections are bounded (issue 17 item 8).

API: ``BoundedHttpServer(sockaddr, family, answer, workers=2, max_connections=64)``; ``answer(method, path) ->
  (status, content_type, body)``; ``server_address``; ``start()`` / ``stop()``.
Design: one thread (``metrics``) accepts connections and reads request heads from all of them with a
  selector, so an idle or half-sent request costs a file descriptor, not a thread; a complete head goes to a
  fixed pool of ``workers`` threads (``metrics-N``) that answer and close (``Connection: close``). At
  ``max_connections`` open connections the oldest one still reading its head is dropped for the new one, so a
  flood of idle connections can never lock out a real scrape, which sends its request at once.
Limits: a request head must be complete within ``HEAD_SECONDS`` and ``MAX_HEAD`` octets (else 408 / 431 and
  close); answers are written with a ``SEND_SECONDS`` socket timeout; at most ``max_connections`` heads wait
  for a worker.
Threading: ``answer`` runs on the worker threads, several at once.
Errors: a broken client only closes its own connection; an exception in ``answer`` is logged and answered 500.
"""

import logging
import queue
import selectors
import socket
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

log = logging.getLogger("pmaster.metrics")

HEAD_SECONDS = 5.0
SEND_SECONDS = 10.0
MAX_HEAD = 8192
POLL_SECONDS = 0.25
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}

Answer = Callable[[str, str], Tuple[int, str, bytes]]


class _Conn:
    __slots__ = ("sock", "since", "data")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.since = time.monotonic()
        self.data = b""


class BoundedHttpServer:
    def __init__(self, sockaddr: tuple, family: int, answer: Answer, workers: int = 2, max_connections: int = 64):
        self.answer = answer
        self.max_connections = max_connections
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(sockaddr)
            self.listener.listen(128)
        except OSError:
            self.listener.close()
            raise
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()
        self.jobs: "queue.Queue[Optional[Tuple[socket.socket, bytes]]]" = queue.Queue(maxsize=max_connections)
        self.reading: Dict[int, _Conn] = {}
        self.stopping = threading.Event()
        self.threads: List[threading.Thread] = []
        self.workers = workers

    # -- lifecycle

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._serve, name="metrics", daemon=True)]
        self.threads += [threading.Thread(target=self._work, name="metrics-%d" % i, daemon=True)
                         for i in range(self.workers)]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for _ in range(self.workers):
            try:
                self.jobs.put(None, timeout=1.0)
            except queue.Full:
                break
        for t in self.threads:
            t.join(5.0)
        self.listener.close()

    # -- the selector thread: accept and read heads

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select(POLL_SECONDS):
                    if key.fileobj is self.listener:
                        self._accept(sel)
                    else:
                        self._read(sel, self.reading.get(key.fd))
                self._expire(sel)
        finally:
            for conn in list(self.reading.values()):
                self._drop(sel, conn)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(self.max_connections):  # drain the backlog, bounded per wake-up
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("metrics: accept failed: %s", exc)
                return
            if len(self.reading) >= self.max_connections:
                self._drop(sel, min(self.reading.values(), key=lambda c: c.since))
            sock.setblocking(False)
            conn = _Conn(sock)
            self.reading[sock.fileno()] = conn
            sel.register(sock, selectors.EVENT_READ)

    def _read(self, sel: selectors.BaseSelector, conn: Optional[_Conn]) -> None:
        if conn is None:
            return
        try:
            chunk = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(sel, conn)
            return
        conn.data += chunk
        if b"\r\n\r\n" in conn.data or b"\n\n" in conn.data:
            self._dispatch(sel, conn)
        elif len(conn.data) > MAX_HEAD:
            self._refuse(sel, conn, 431)

    def _dispatch(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        self._forget(sel, conn)
        try:
            self.jobs.put_nowait((conn.sock, conn.data))
        except queue.Full:
            _reply(conn.sock, 503, "text/plain", b"busy\n", blocking=False)
            conn.sock.close()

    def _expire(self, sel: selectors.BaseSelector) -> None:
        limit = time.monotonic() - HEAD_SECONDS
        for conn in [c for c in self.reading.values() if c.since < limit]:
            self._refuse(sel, conn, 408)

    def _refuse(self, sel: selectors.BaseSelector, conn: _Conn, status: int) -> None:
        self._forget(sel, conn)
        _reply(conn.sock, status, "text/plain", b"", blocking=False)
        conn.sock.close()

    def _forget(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        self.reading.pop(conn.sock.fileno(), None)
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        self._forget(sel, conn)
        conn.sock.close()

    # -- the workers: answer complete requests

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or self.stopping.is_set():
                if job is not None:
                    job[0].close()
                return
            sock, head = job
            try:
                self._answer(sock, head)
            finally:
                sock.close()

    def _answer(self, sock: socket.socket, head: bytes) -> None:
        parts = head.split(b"\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            _reply(sock, 400, "text/plain", b"bad request\n")
            return
        method, target = parts[0], parts[1]
        try:
            status, ctype, body = self.answer(method, target)
        except Exception:  # a failing collector must not end the worker
            log.exception("metrics: scrape failed")
            status, ctype, body = 500, "text/plain", b"scrape failed\n"
        _reply(sock, status, ctype, b"" if method == "HEAD" else body, length=len(body))


def _reply(sock: socket.socket, status: int, ctype: str, body: bytes, length: Optional[int] = None,
           blocking: bool = True) -> None:
    """Send a whole answer; ``blocking=False`` (the selector thread) sends what the socket takes at once."""
    head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, _REASONS.get(status, "Error"), ctype, len(body) if length is None else length))
    data = head.encode("latin-1") + body
    try:
        if not blocking:
            sock.send(data)
            return
        sock.settimeout(SEND_SECONDS)
        sock.sendall(data)
    except OSError:
        pass  # the client went away or reads nothing: its loss
