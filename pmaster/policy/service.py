"""``policy-service``: a client of Postfix's policy delegation protocol (SMTPD_POLICY_README), asked at RCPT.

API:
  ``parse_endpoint(text) -> (kind, target)``: ``inet:HOST:PORT`` -> ("inet", (host, port)), ``unix:/path`` ->
     ("unix", path), ``exec:COMMAND ARGS...`` -> ("exec", argv); raises ``ValueError`` with the reason.
  ``ServiceClient(text)``: the connections to one service (a pool: sessions run in parallel threads);
     ``ask(attributes, timeout) -> action text`` raises ``ServiceError``; ``close()``.
  ``request_attributes(view) -> Dict[str, str]``: the request of SPEC 6 for the recipient being checked.
  ``interpret(action, view, outcome) -> (Optional[Reply], label)``: the reply an action answers, and the
     metric label of the action.
  ``ServiceCheck`` (the ``Check``), and ``checks(smtpd, config, resources)`` (the chain factory).
Invariants:
  - Fail closed: a service that cannot be reached, does not answer within ``policy-service-timeout``, closes
    the connection or answers something that is not ``name=value`` lines ending in an empty line answers
    451 4.3.0; an action this version does not know answers 451 4.3.5. Never an accept.
  - Connections are kept for the next request; a kept connection that the service closed meanwhile is
    replaced once, silently (Postfix's policy client does the same). A connection that failed is closed.
  - ``exec:`` programs are started on demand, kept running, and started again when they have exited;
    their stderr goes to the log. Each running program serves one request at a time.
  - The client and its connections live in ``Resources``: a reload that names the same service keeps them.
Threading: ``ServiceClient`` is shared by every session thread; each request holds one connection alone.
Errors: ``ServiceError`` (unreachable, timeout, closed, garbled) inside; the check turns it into 451 4.3.0.
"""

import logging
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from pmaster.errors import PmasterError
from pmaster.policy.chain import Check, Outcome, Resources
from pmaster.reply import Reply

log = logging.getLogger("pmaster.policy")

FAILED = Reply(451, "4.3.0", "Temporary lookup failure")
UNKNOWN_ACTION = Reply(451, "4.3.5", "Server configuration problem")
MAX_REPLY = 16 * 1024  # octets of one answer; more is garbage
MAX_IDLE_SECONDS = 300.0  # Postfix's smtpd_policy_service_max_idle
MAX_SOCKETS = 32  # connections to one inet: or unix: service at once
MAX_PROGRAMS = 4  # running copies of one exec: program
_HEADER = re.compile(r"[!-9;-~]+:[^\r\n\0]*")
_CODE = re.compile(r"([45])\d\d(?:\s+(.*))?", re.S)
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?:\s+|$)")


class ServiceError(Exception):
    """The service failed to answer: unreachable, timeout, closed, or garbled."""


def parse_endpoint(text: str) -> Tuple[str, Any]:
    kind, _, rest = text.partition(":")
    if kind == "inet":
        host, sep, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected inet:HOST:PORT, got %r" % text)
        return "inet", (host, int(port))
    if kind == "unix":
        if not rest.startswith("/"):
            raise ValueError("expected unix:/PATH (an absolute path), got %r" % text)
        return "unix", rest
    if kind == "exec":
        try:
            argv = shlex.split(rest)
        except ValueError as exc:
            raise ValueError("exec: %s" % exc)
        if not argv:
            raise ValueError("exec: needs a command")
        return "exec", argv
    raise ValueError("expected inet:HOST:PORT, unix:/PATH or exec:COMMAND ARGS..., got %r" % text)


# ----------------------------------------------------------------------------------------------------
# Connections


class _Connection:
    """One request at a time over a stream; ``reused`` once it has answered a request."""

    def __init__(self) -> None:
        self.reused = False
        self.idle_since = time.monotonic()
        self._buf = b""

    def ask(self, request: bytes, deadline: float) -> Tuple[List[str], bool]:
        """Send ``request`` and read the answer's lines; -> (lines, whether any byte of the answer came)."""
        self._send(request, deadline)
        lines: List[str] = []
        total = 0
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_REPLY:
                    raise ServiceError("answer longer than %d octets" % MAX_REPLY)
                data = self._recv(deadline)
                if not data:
                    raise _Closed(bool(lines or self._buf))
                self._buf += data
                continue
            line, self._buf = self._buf[:nl], self._buf[nl + 1:]
            total += nl + 1
            if total > MAX_REPLY:
                raise ServiceError("answer longer than %d octets" % MAX_REPLY)
            text = line.decode("utf-8", "replace").rstrip("\r")
            if not text:
                if self._buf:
                    raise ServiceError("data after the end of the answer")
                return lines, True
            lines.append(text)

    def _send(self, data: bytes, deadline: float) -> None:
        raise NotImplementedError

    def _recv(self, deadline: float) -> bytes:
        raise NotImplementedError

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        raise NotImplementedError


class _Closed(ServiceError):
    def __init__(self, partial: bool):
        ServiceError.__init__(self, "connection closed in the middle of the answer" if partial
                              else "connection closed without an answer")
        self.partial = partial


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ServiceError("timeout")
    return left


class _SocketConnection(_Connection):
    def __init__(self, family: int, address: Any, deadline: float):
        _Connection.__init__(self)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(_remaining(deadline))
            self.sock.connect(address)
        except socket.timeout:
            self.sock.close()
            raise ServiceError("timeout connecting")
        except OSError as exc:
            self.sock.close()
            raise ServiceError("cannot connect: %s" % (exc.strerror or exc))

    def _send(self, data: bytes, deadline: float) -> None:
        try:
            self.sock.settimeout(_remaining(deadline))
            self.sock.sendall(data)
        except socket.timeout:
            raise ServiceError("timeout")
        except OSError:
            raise _Closed(False)

    def _recv(self, deadline: float) -> bytes:
        try:
            self.sock.settimeout(_remaining(deadline))
            return self.sock.recv(4096)
        except socket.timeout:
            raise ServiceError("timeout")
        except OSError:
            return b""

    def alive(self) -> bool:
        """False when the service closed the kept connection (it is readable: EOF, or unasked data)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _ProgramConnection(_Connection):
    """A running ``exec:`` program: requests on its stdin, answers on its stdout, stderr to the log."""

    def __init__(self, argv: List[str]):
        _Connection.__init__(self)
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        except OSError as exc:
            raise ServiceError("cannot run %s: %s" % (argv[0], exc.strerror or exc))
        self.name = os.path.basename(argv[0])
        log.info("policy-service: started %s (pid %d)", " ".join(argv), self.proc.pid)
        threading.Thread(target=self._drain_stderr, name="policy-exec:%d" % self.proc.pid, daemon=True).start()

    def _drain_stderr(self) -> None:
        stderr = self.proc.stderr
        try:
            for line in iter(stderr.readline, b""):
                log.warning("policy-service %s[%d]: %s", self.name, self.proc.pid,
                            line.decode("utf-8", "replace").rstrip())
        except (OSError, ValueError):
            pass

    def _send(self, data: bytes, deadline: float) -> None:
        fd = self.proc.stdin.fileno()
        view = memoryview(data)
        while view:
            _, writable, _ = select.select([], [fd], [], _remaining(deadline))
            if not writable:
                continue
            try:
                view = view[os.write(fd, view):]
            except OSError:
                raise _Closed(False)

    def _recv(self, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        readable, _, _ = select.select([fd], [], [], _remaining(deadline))
        if not readable:
            raise ServiceError("timeout")
        try:
            return os.read(fd, 4096)
        except OSError:
            return b""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Close its stdin (a policy program exits at end of input); kill its group if it does not."""
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                log.error("policy-service: %s[%d] does not exit", self.name, self.proc.pid)
        if self.proc.returncode not in (None, 0):
            log.warning("policy-service: %s[%d] ended with status %s", self.name, self.proc.pid,
                        self.proc.returncode)


class ServiceClient:
    """The connections to one policy service; a request takes one alone (kept ones first)."""

    def __init__(self, text: str):
        self.text = text
        self.kind, self.target = parse_endpoint(text)
        self._lock = threading.Condition()
        self._idle: List[_Connection] = []
        self._busy = 0
        self._limit = MAX_PROGRAMS if self.kind == "exec" else MAX_SOCKETS
        self._closed = False

    def ask(self, attributes: Dict[str, str], timeout: float) -> str:
        """The value of ``action=`` the service answered; raises ``ServiceError``."""
        deadline = time.monotonic() + timeout
        request = _encode(attributes)
        conn = self._take(deadline)
        try:
            try:
                lines, _ = conn.ask(request, deadline)
            except _Closed as exc:
                if not conn.reused or exc.partial:
                    raise
                # The service dropped a kept connection between requests: one fresh try (as Postfix).
                conn.close()
                conn = self._open(deadline)
                lines, _ = conn.ask(request, deadline)
            action = _action(lines)
        except BaseException:
            _close_later(conn)  # a hung program takes a second to end: not the client's wait
            self._release(None)
            raise
        conn.reused = True
        self._release(conn)
        return action

    def _take(self, deadline: float) -> _Connection:
        with self._lock:
            while True:
                if self._closed:
                    raise ServiceError("client closed")
                while self._idle:
                    conn = self._idle.pop()
                    if conn.alive() and time.monotonic() - conn.idle_since < MAX_IDLE_SECONDS:
                        self._busy += 1
                        return conn
                    _close_later(conn)
                if self._busy < self._limit:
                    self._busy += 1
                    break
                if not self._lock.wait(_remaining(deadline)):
                    raise ServiceError("timeout: all %d connections busy" % self._limit)
        try:
            return self._open(deadline)
        except BaseException:
            self._release(None)
            raise

    def _open(self, deadline: float) -> _Connection:
        if self.kind == "exec":
            return _ProgramConnection(self.target)
        if self.kind == "unix":
            return _SocketConnection(socket.AF_UNIX, self.target, deadline)
        host, port = self.target
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ServiceError("cannot resolve %s: %s" % (host, exc.strerror))
        family, _, _, _, address = infos[0]
        return _SocketConnection(family, address, deadline)

    def _release(self, conn: Optional[_Connection]) -> None:
        with self._lock:
            self._busy -= 1
            if conn is not None:
                if self._closed:
                    _close_later(conn)
                else:
                    conn.idle_since = time.monotonic()
                    self._idle.append(conn)
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._lock.notify_all()
        for conn in idle:
            conn.close()

    def __repr__(self) -> str:
        return "<policy-service %s>" % self.text


def _close_later(conn: _Connection) -> None:
    """Close outside the caller's lock: ending a program may take a second."""
    threading.Thread(target=conn.close, name="policy-close", daemon=True).start()


def _encode(attributes: Dict[str, str]) -> bytes:
    out = []
    for name, value in attributes.items():
        out.append("%s=%s\n" % (name, re.sub(r"[\r\n\0]", " ", value)))
    return ("".join(out) + "\n").encode("utf-8", "replace")


def _action(lines: List[str]) -> str:
    action = None
    for line in lines:
        name, sep, value = line.partition("=")
        if not sep or not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ServiceError("garbled answer line %r" % line[:80])
        if name == "action":
            action = value
    if action is None:
        raise ServiceError("answer without action=")
    return action


# ----------------------------------------------------------------------------------------------------
# The request and the answer


def request_attributes(view: Any) -> Dict[str, str]:
    """SPEC 6's attributes; ``recipient_count`` is 0 at RCPT and ``queue_id`` empty, as in Postfix's RCPT state."""
    tls = view.tls or ""
    protocol, _, cipher = tls.partition(" ")
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP" if view.esmtp else "SMTP",
        "helo_name": view.helo or "",
        "queue_id": view.queue_id or "",
        "sender": view.mail_from or "",
        "recipient": view.recipient or "",
        "recipient_count": "0",
        "client_address": view.client_address,
        "client_port": str(view.client_port),
        "client_name": view.client_name or "unknown",
        "reverse_client_name": view.client_name or "unknown",
        "instance": view.instance,
        "size": str(view.size or 0),
        "encryption_protocol": protocol,
        "encryption_cipher": cipher,
        "sasl_username": "",
    }


def _text(view: Any, text: str) -> str:
    # Postfix's form for a recipient restriction: "<rcpt>: Recipient address rejected: text".
    return "<%s>: Recipient address rejected: %s" % (view.recipient or "", text)


def interpret(action: str, view: Any, outcome: Outcome) -> Tuple[Optional[Reply], str]:
    """The reply of one ``action=`` value (None: go on) and its metric label (SPEC 6's list)."""
    verb, _, text = action.strip().partition(" ")
    text = text.strip()
    word = verb.upper()
    if word in ("OK", "DUNNO"):
        return None, word.lower()
    if word == "REJECT":
        return Reply(550, "5.7.1", _text(view, text or "Access denied")), "reject"
    if word == "DEFER":
        return Reply(450, "4.7.1", _text(view, text or "Try again later")), "defer"
    if word == "DEFER_IF_PERMIT":
        outcome.defer_if_permit(Reply(450, "4.7.1", _text(view, text or "Try again later")))
        return None, "defer_if_permit"
    if word == "DEFER_IF_REJECT":
        outcome.defer_if_reject(Reply(450, "4.7.1", _text(view, text or "Try again later")))
        return None, "defer_if_reject"
    if word == "PREPEND":
        if not _HEADER.fullmatch(text):
            log.error("policy-service: PREPEND of a bad header %r; answering 451 4.3.5", text[:200])
            return UNKNOWN_ACTION, "unknown"
        outcome.prepend.append(text)
        return None, "prepend"
    if word in ("WARN", "INFO"):
        (log.warning if word == "WARN" else log.info)("policy-service %s: RCPT from [%s]: %s; from=<%s> to=<%s>",
                                                      word.lower(), view.client_address, text, view.mail_from,
                                                      view.recipient)
        return None, word.lower()
    if word in ("HOLD", "DISCARD"):
        reason = text or "by policy service"
        if word == "HOLD":
            outcome.hold = outcome.hold or reason
        else:
            outcome.discard = outcome.discard or reason
        return None, word.lower()
    m = _CODE.fullmatch(action.strip())
    if m:
        return _code_reply(view, action.strip(), m), "code"
    log.error("policy-service: unknown action %r; answering 451 4.3.5", action[:200])
    return UNKNOWN_ACTION, "unknown"


def _code_reply(view: Any, action: str, m: "re.Match") -> Reply:
    code = int(action[:3])
    text = (m.group(2) or "").strip()
    enhanced = "%s.7.1" % m.group(1)
    e = _ENHANCED.match(text)
    if e and e.group(1) == m.group(1):
        enhanced, text = text[:e.end()].strip(), text[e.end():]
    return Reply(code, enhanced, _text(view, text or ("Access denied" if code >= 500 else "Try again later")))


class ServiceCheck(Check):
    name = "policy_service"
    stages = frozenset(("rcpt",))

    def __init__(self, client: ServiceClient, timeout: float, resources: Resources):
        self.client = client
        self.timeout = timeout
        self.resources = resources

    def check(self, stage: str, view: Any, outcome: Outcome) -> Optional[Reply]:
        started = time.monotonic()
        try:
            action = self.client.ask(request_attributes(view), self.timeout)
        except ServiceError as exc:
            log.error("policy-service %s failed for RCPT from [%s]: %s; answering 451 4.3.0", self.client.text,
                      view.client_address, exc)
            self._measure("failed", started)
            return FAILED
        reply, label = interpret(action, view, outcome)
        self._measure(label, started)
        return reply

    def _measure(self, label: str, started: float) -> None:
        metrics = self.resources.metrics()
        if metrics is not None:
            metrics.policy_service(label, time.monotonic() - started)


def checks(smtpd: Any, config: Any, resources: Resources) -> List[Check]:
    """The chain factory: the listener's ``policy-service``, its client kept across reloads."""
    text = smtpd.policy_service
    if text is None:
        return []
    try:
        parse_endpoint(text)
    except ValueError as exc:
        raise PmasterError("[smtpd %s] policy-service: %s" % (smtpd.ident, exc))
    client = resources.get(("policy-service", text), lambda: ServiceClient(text))
    return [ServiceCheck(client, float(smtpd.policy_service_timeout), resources)]
