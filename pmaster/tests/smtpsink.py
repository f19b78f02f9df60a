"""A controllable SMTP server on loopback for tests: records what it receives, misbehaves on request.

API:
  ``SmtpSink(**behaviour)`` is a context manager listening on ``127.0.0.1`` (ephemeral port)::

      with SmtpSink(rcpt_replies={"bob@x.test": "550 5.1.1 <bob@x.test>: no such user"}) as sink:
          ...deliver to sink.address...
          assert sink.messages[0].rcpts == ["alice@x.test"]

  Behaviours (keyword arguments, also plain attributes that a test may change while the sink runs):
    ``host``, ``port``    where to listen (default ``127.0.0.1``, an ephemeral port; Linux answers on all of
                          127/8, so two sinks may share a port on ``127.0.0.1`` and ``127.0.0.2``)
    ``greeting``          first reply, e.g. ``"421 4.3.2 busy"`` or ``"554 no service"`` (then it hangs up)
    ``greeting_delay``    seconds to wait before the greeting (a stalled server)
    ``ehlo_reply``        replaces the EHLO answer (e.g. ``"502 5.5.1 no EHLO"`` to force the HELO fallback)
    ``mail_reply``        replaces the MAIL answer (e.g. ``"451 4.3.0 later"``, ``"550 5.7.1 denied"``)
    ``rcpt_replies``      ``{address: reply}`` per recipient (address compared case-insensitively)
    ``data_reply``        replaces the final answer after the message text
    ``tempfail_first``    the first N transactions get ``tempfail_reply`` (default 451) after the message text
    ``drop_after_rcpt``   hang up right after answering the N-th RCPT of a session (0: never)
    ``tls_context``       a server ``ssl.SSLContext``: STARTTLS is offered (see ``tls_server_context``)
    ``broken_tls``        offer STARTTLS, answer 220, then send garbage and hang up (a failed handshake)
    ``require_tls``       MAIL before STARTTLS gets ``530 5.7.0``
    ``auth_users``        ``{user: password}``: AUTH is offered with ``auth_mechanisms`` (PLAIN LOGIN)
    ``auth_requires_tls`` offer AUTH only after STARTTLS (default True, like real servers)
    ``require_auth``      MAIL before a successful AUTH gets ``530 5.7.0``
    ``size_limit``        advertise ``SIZE n`` and refuse larger messages with ``552 5.3.4``
    ``keep_data``         keep message bytes (default True); False keeps only size and sha256
    ``timeout``           per-read timeout of a session (default 10 s)
    ``idle_timeout``      a client silent this long between commands gets ``421 4.4.2`` and is dropped (0: never)
    ``rset_reply``        replaces the RSET answer (e.g. ``"500 5.5.1 no"``)
    ``session_mail_limit`` MAIL number N+1 of one session gets ``421 4.7.0`` and the hang-up (0: no limit)
    ``pipelining``        advertise PIPELINING (default True)
  Records: ``messages`` (accepted ``Transaction`` objects), ``transactions`` (every message text received,
  with its final ``reply``), ``sessions`` (``Session``: peer, ehlo, tls, auth user, command lines),
  ``auth_attempts`` (``(mechanism, user, tls)``), ``connections`` (count), ``open_sessions`` (sessions
  connected now). ``wait_for_messages(n, timeout)``
  blocks until ``n`` messages were accepted. ``.address`` is ``(host, port)``.
  ``tls_server_context(ca, *names)`` builds a server context from a trustme CA.
Invariants: message text is stored dot-unstuffed with its CRLF line ends, as a real server's spool would.
Threading: one daemon thread per session; the records are appended under a lock; ``close()`` hangs up
  every open session.
"""

import base64
import hashlib
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

MAX_COMMANDS = 10000  # per session: bounds every loop even with a misbehaving client
MAX_LINES = 10 * 1000 * 1000  # per message text


@dataclass
class Transaction:
    mail_from: str
    mail_params: List[str]
    rcpts: List[str]  # recipients that got a 2xx
    ehlo: str
    tls: bool
    auth: Optional[str]  # authenticated user name, if any
    data: bytes = b""
    size: int = 0
    sha256: str = ""
    reply: str = ""  # final reply after the message text


@dataclass
class Session:
    peer: Tuple[str, int]
    ehlo: str = ""
    tls: bool = False
    auth: Optional[str] = None
    commands: List[str] = field(default_factory=list)


def tls_server_context(ca, *names: str) -> ssl.SSLContext:
    """A server context with a certificate for ``names`` issued by the trustme CA ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*(names or ("localhost", "127.0.0.1"))).configure_cert(ctx)
    return ctx


class SmtpSink:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, greeting: str = "220 sink.test ESMTP ready",
                 greeting_delay: float = 0.0, ehlo_reply: Optional[str] = None,
                 mail_reply: Optional[str] = None, rcpt_replies: Optional[Dict[str, str]] = None,
                 data_reply: Optional[str] = None, tempfail_first: int = 0,
                 tempfail_reply: str = "451 4.3.0 Try again later", drop_after_rcpt: int = 0,
                 tls_context: Optional[ssl.SSLContext] = None, broken_tls: bool = False,
                 require_tls: bool = False, auth_users: Optional[Dict[str, str]] = None,
                 auth_mechanisms: Tuple[str, ...] = ("PLAIN", "LOGIN"), auth_requires_tls: bool = True,
                 require_auth: bool = False,
                 size_limit: Optional[int] = None, keep_data: bool = True, timeout: float = 10.0,
                 hostname: str = "sink.test", idle_timeout: float = 0.0, rset_reply: Optional[str] = None,
                 session_mail_limit: int = 0, pipelining: bool = True):
        self.host = host
        self.bind_port = port
        self.greeting = greeting
        self.greeting_delay = greeting_delay
        self.ehlo_reply = ehlo_reply
        self.mail_reply = mail_reply
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.data_reply = data_reply
        self.tempfail_first = tempfail_first
        self.tempfail_reply = tempfail_reply
        self.drop_after_rcpt = drop_after_rcpt
        self.tls_context = tls_context
        self.broken_tls = broken_tls
        self.require_tls = require_tls
        self.auth_users = auth_users
        self.auth_mechanisms = tuple(m.upper() for m in auth_mechanisms)
        self.auth_requires_tls = auth_requires_tls
        self.require_auth = require_auth
        self.size_limit = size_limit
        self.keep_data = keep_data
        self.pipelining = pipelining
        self.timeout = timeout
        self.hostname = hostname
        self.idle_timeout = idle_timeout
        self.rset_reply = rset_reply
        self.session_mail_limit = session_mail_limit
        self.messages: List[Transaction] = []
        self.transactions: List[Transaction] = []
        self.sessions: List[Session] = []
        self.auth_attempts: List[Tuple[str, str, bool]] = []
        self.connections = 0
        self._cond = threading.Condition()
        self._open: List[socket.socket] = []
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> Tuple[str, int]:
        assert self._server is not None, "sink not started"
        return (self.host, self._server.server_address[1])

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def open_sessions(self) -> int:
        with self._cond:
            return len(self._open)

    def start(self) -> "SmtpSink":
        self._server = _Server((self.host, self.bind_port), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="smtpsink", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._cond:
            for s in self._open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> List[Transaction]:
        """Block until ``count`` messages were accepted (or ``timeout``); returns the accepted messages."""
        end = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self.messages)

    # -- used by sessions --------------------------------------------------------------------------

    def _record(self, what: str, item) -> None:
        with self._cond:
            getattr(self, what).append(item)
            self._cond.notify_all()

    def _register(self, sock: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._open.append(sock)
                self.connections += 1
            elif sock in self._open:
                self._open.remove(sock)

    def _take_tempfail(self) -> bool:
        with self._cond:
            if self.tempfail_first > 0:
                self.tempfail_first -= 1
                return True
            return False


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, sink: SmtpSink):
        self.sink = sink
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up mid-session is normal in these tests


class _Hangup(Exception):
    pass


class _Handler(socketserver.BaseRequestHandler):
    def setup(self) -> None:
        self.sink: SmtpSink = self.server.sink  # type: ignore[attr-defined]
        self.conn: socket.socket = self.request
        self.conn.settimeout(self.sink.timeout)
        # One write per reply: without this, a pipelined client waits for each reply behind Nagle's algorithm
        # and its own delayed ACK (a real PIPELINING server sends the replies of a batch together).
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.conn.makefile("rb")
        self.sess = Session(peer=self.client_address)
        self.sink._register(self.request, True)
        self.sink._record("sessions", self.sess)
        self.authed: Optional[str] = None
        self.txn: Optional[Transaction] = None
        self.rcpt_count = 0
        self.mail_count = 0

    def finish(self) -> None:
        self.sink._register(self.request, False)
        try:
            self.conn.close()
        except OSError:
            pass

    def send(self, *lines: str) -> None:
        out = []
        for i, line in enumerate(lines):
            code, text = line[:3], line[4:]
            out.append("%s%s%s\r\n" % (code, "-" if i < len(lines) - 1 else " ", text))
        self.conn.sendall("".join(out).encode("utf-8"))

    def readline(self) -> bytes:
        line = self.reader.readline(1 << 20)
        if not line:
            raise _Hangup()
        return line

    def handle(self) -> None:
        try:
            if self.sink.greeting_delay:
                time.sleep(self.sink.greeting_delay)
            self.send(self.sink.greeting)
            if not self.sink.greeting.startswith("220"):
                return
            for _ in range(MAX_COMMANDS):
                line = self.read_command().decode("utf-8", "replace").rstrip("\r\n")
                self.sess.commands.append(line)
                verb, _, arg = line.partition(" ")
                handler = getattr(self, "do_" + verb.upper(), None)
                if handler is None:
                    self.send("502 5.5.1 Command not implemented")
                elif handler(arg.strip()) is False:
                    return
        except (_Hangup, OSError, ssl.SSLError):
            return

    def read_command(self) -> bytes:
        """The next command line; with ``idle_timeout``, a client that stays silent is told 421 and dropped."""
        idle = self.sink.idle_timeout
        if not idle:
            return self.readline()
        self.conn.settimeout(idle)
        try:
            return self.readline()
        except socket.timeout:
            self.send("421 4.4.2 %s Error: timeout exceeded" % self.sink.hostname)
            raise _Hangup() from None
        finally:
            self.conn.settimeout(self.sink.timeout)

    # -- verbs: each returns False to end the session ----------------------------------------------

    def extensions(self) -> List[str]:
        s = self.sink
        ext = (["PIPELINING"] if s.pipelining else []) + ["8BITMIME", "ENHANCEDSTATUSCODES"]
        if s.size_limit:
            ext.append("SIZE %d" % s.size_limit)
        if (s.tls_context is not None or s.broken_tls) and not self.sess.tls:
            ext.append("STARTTLS")
        if s.auth_users is not None and (self.sess.tls or not s.auth_requires_tls):
            ext.append(" ".join(("AUTH",) + s.auth_mechanisms))
        return ext

    def do_EHLO(self, arg: str):
        if self.sink.ehlo_reply:
            self.send(self.sink.ehlo_reply)
            return not self.sink.ehlo_reply.startswith("421")
        self.sess.ehlo = arg
        self.txn = None
        self.send(*["250 " + self.sink.hostname] + ["250 " + e for e in self.extensions()])

    def do_HELO(self, arg: str):
        self.sess.ehlo = arg
        self.txn = None
        self.send("250 " + self.sink.hostname)

    def do_STARTTLS(self, arg: str):
        s = self.sink
        if "STARTTLS" not in self.extensions():
            self.send("502 5.5.1 STARTTLS not offered")
            return
        self.send("220 2.0.0 Ready to start TLS")
        if s.broken_tls:
            self.conn.sendall(b"this is not a TLS server hello\r\n")
            return False
        self.conn = s.tls_context.wrap_socket(self.conn, server_side=True)  # type: ignore[union-attr]
        self.reader = self.conn.makefile("rb")  # plaintext read ahead is discarded (RFC 3207 section 6)
        self.sess.tls = True
        self.sess.ehlo = ""
        self.txn = None

    def do_AUTH(self, arg: str):
        s = self.sink
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        offered = any(e.startswith("AUTH ") for e in self.extensions())
        if not offered or mech not in s.auth_mechanisms or mech not in ("PLAIN", "LOGIN"):
            self.send("504 5.5.4 Unrecognized authentication type")
            return
        if mech == "PLAIN":
            blob = initial or self.challenge("")
            parts = _b64(blob).split("\0")
            user, password = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
        else:
            user = _b64(initial) if initial else _b64(self.challenge("VXNlcm5hbWU6"))
            password = _b64(self.challenge("UGFzc3dvcmQ6"))
        s._record("auth_attempts", (mech, user, self.sess.tls))
        if s.auth_users is not None and s.auth_users.get(user) == password:
            self.authed = self.sess.auth = user
            self.send("235 2.7.0 Authentication successful")
        else:
            self.send("535 5.7.8 Authentication credentials invalid")

    def challenge(self, text: str) -> str:
        self.send("334 " + text)
        return self.readline().decode("ascii", "replace").strip()

    def do_MAIL(self, arg: str):
        s = self.sink
        if not arg.upper().startswith("FROM:"):
            self.send("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        if s.require_tls and not self.sess.tls:
            self.send("530 5.7.0 Must issue a STARTTLS command first")
            return
        if s.require_auth and not self.authed:
            self.send("530 5.7.0 Authentication required")
            return
        if s.mail_reply:
            self.send(s.mail_reply)
            return not s.mail_reply.startswith("421")
        self.mail_count += 1
        if s.session_mail_limit and self.mail_count > s.session_mail_limit:
            self.send("421 4.7.0 %s Error: too many messages in this session" % s.hostname)
            return False
        addr, params = _path(arg[5:])
        self.txn = Transaction(addr, params, [], self.sess.ehlo, self.sess.tls, self.authed)
        self.send("250 2.1.0 Sender OK")

    def do_RCPT(self, arg: str):
        if self.txn is None:
            self.send("503 5.5.1 Need MAIL before RCPT")
            return
        addr, _ = _path(arg[3:])
        reply = self.sink.rcpt_replies.get(addr.lower(), "250 2.1.5 Recipient OK")
        if reply.startswith("2"):
            self.txn.rcpts.append(addr)
        self.send(reply)
        self.rcpt_count += 1
        if reply.startswith("421") or self.rcpt_count == self.sink.drop_after_rcpt:
            return False

    def do_DATA(self, arg: str):
        if self.txn is None or not self.txn.rcpts:
            self.send("503 5.5.1 Need RCPT before DATA")
            return
        self.send("354 End data with <CR><LF>.<CR><LF>")
        txn, self.txn = self.txn, None
        self.read_message(txn)
        s = self.sink
        if s._take_tempfail():
            txn.reply = s.tempfail_reply
        elif s.size_limit and txn.size > s.size_limit:
            txn.reply = "552 5.3.4 Message size exceeds fixed maximum message size"
        else:
            txn.reply = s.data_reply or "250 2.0.0 Ok: queued as %d" % (len(s.transactions) + 1)
        s._record("transactions", txn)
        if txn.reply.startswith("2"):
            s._record("messages", txn)
        self.send(txn.reply)

    def read_message(self, txn: Transaction) -> None:
        digest = hashlib.sha256()
        chunks: List[bytes] = []
        for _ in range(MAX_LINES):
            line = self.readline()
            if line == b".\r\n":
                break
            if line.startswith(b"."):
                line = line[1:]  # RFC 5321 section 4.5.2: remove the stuffed dot
            txn.size += len(line)
            digest.update(line)
            if self.sink.keep_data:
                chunks.append(line)
        txn.data = b"".join(chunks)
        txn.sha256 = digest.hexdigest()

    def do_RSET(self, arg: str):
        self.txn = None
        self.send(self.sink.rset_reply or "250 2.0.0 Reset OK")

    def do_NOOP(self, arg: str):
        self.send("250 2.0.0 OK")

    def do_QUIT(self, arg: str):
        self.send("221 2.0.0 Bye")
        return False


def _b64(text: str) -> str:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8", "replace")
    except (ValueError, UnicodeError):
        return ""


def _path(arg: str) -> Tuple[str, List[str]]:
    """``<addr> P1 P2`` -> (addr, [P1, P2]); tolerates a space after the colon."""
    arg = arg.strip()
    if arg.startswith("<") and ">" in arg:
        end = arg.index(">")
        return arg[1:end], arg[end + 1:].split()
    words = arg.split()
    return (words[0] if words else ""), words[1:]
