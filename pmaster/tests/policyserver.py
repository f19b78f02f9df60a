"""A scripted Postfix policy server for tests (SMTPD_POLICY_README protocol over TCP on loopback).

API:
  ``PolicyServer(answer)``, a context manager: ``answer(attributes) -> bytes`` gives the raw answer to send
     for one request (``action_answer("REJECT no")`` builds the usual ``action=...\\n\\n``). Special
     answers: ``HANG`` (never answer; the connection stays open), ``CLOSE`` (close without answering),
     ``CLOSE_AFTER + data`` (send ``data``, then close).
  ``.address`` -> ``(host, port)``; ``.requests``: every request's attributes, in order; ``.connections``:
     how many connections were accepted; ``drop_idle()`` closes the kept connections (the server side).
Invariants: loopback only, an ephemeral port; every blocking call has a timeout; ``close()`` ends all threads.
"""

import socket
import socketserver
import threading
from typing import Callable, Dict, List

HANG = b"<hang>"
CLOSE = b"<close>"
CLOSE_AFTER = b"<close-after>"  # prefix: send the rest, then close the connection


def action_answer(action: str) -> bytes:
    return ("action=%s\n\n" % action).encode()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: "PolicyServer" = self.server.owner  # type: ignore[attr-defined]
        sock = self.request
        sock.settimeout(30)
        with server.lock:
            server.connections += 1
            server.open_socks.append(sock)
        buf = b""
        try:
            while not server.closing.is_set():
                while b"\n\n" not in buf:
                    data = sock.recv(4096)
                    if not data:
                        return
                    buf += data
                raw, buf = buf.split(b"\n\n", 1)
                attrs: Dict[str, str] = {}
                for line in raw.decode().split("\n"):
                    name, _, value = line.partition("=")
                    attrs[name] = value
                with server.lock:
                    server.requests.append(attrs)
                answer = server.answer(attrs)
                if answer == HANG:
                    server.closing.wait(30)
                    return
                if answer == CLOSE:
                    return
                if answer.startswith(CLOSE_AFTER):
                    sock.sendall(answer[len(CLOSE_AFTER):])
                    return
                sock.sendall(answer)
        except OSError:
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class PolicyServer:
    def __init__(self, answer: Callable[[Dict[str, str]], bytes]):
        self.answer = answer
        self.lock = threading.Lock()
        self.requests: List[Dict[str, str]] = []
        self.connections = 0
        self.open_socks: List[socket.socket] = []
        self.closing = threading.Event()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.owner = self  # type: ignore[attr-defined]
        self.address = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="policyserver", daemon=True)

    def drop_idle(self) -> None:
        with self.lock:
            socks, self.open_socks = self.open_socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "PolicyServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.drop_idle()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
