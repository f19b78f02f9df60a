"""SMTP server: listeners (one ThreadingTCPServer per address) and the per-connection session.

API:
  ``Runtime``: what sessions share: the current ``Config`` and ``Router`` (swapped whole on reload), the
     ``Spool``, TLS contexts, the session registry and a ``notify(queue_id, (stamp, envelope))`` hook that
     wakes the scheduler (and hands it the envelope just committed).
  ``listen_addresses(smtpd) -> List[(family, sockaddr, label)]``: resolves ``listen-port`` values.
  ``Listener(runtime, ident, family, sockaddr)``: a bound server; ``serve_forever()`` in its own thread,
     ``shutdown()`` from another; ``idle_threads``: session threads waiting in accept() (at least one while
     serving; they end at ``shutdown``/``server_close``).
  ``Session``: one SMTP conversation; per verb a check step (raises ``SmtpError``) and a proceed step.
Invariants:
  - Replies are turned into bytes in one place, ``Session._send``; handlers raise ``SmtpError`` or return a
    ``Reply``. Replies to pipelined commands are written in order and flushed once per batch (RFC 2920).
  - 250 after DATA only after ``SpoolWriter.commit`` returned (file and directory fsynced); a storage
    failure answers 452 4.3.1 and leaves nothing behind (SPEC 4).
  - The spool file is opened before 354 (a spool that cannot take one refuses DATA with 452 4.3.1), and a
    DATA body is always read to its final dot, whatever fails while storing it, so no body line is ever
    taken for a command. A session that ends mid-DATA leaves nothing in the spool.
  - A session never takes the daemon down: any exception is logged and answered with 421.
Threading: one thread per session at a time; a thread accepts its connection itself and, when the session
  ends, waits in accept() for the next (a small per-listener pool); sessions share only ``Runtime``, whose
  config snapshot is read-only.
Errors: ``listen_addresses`` and ``Listener`` raise ``PmasterError`` with one line naming the section and the
  address (unknown service, unresolvable host, port in use); the CLI prints it and exits non-zero.
"""

import email.parser
import email.policy
import email.utils
import errno
import logging
import re
import socket
import socketserver
import sys
import threading
import time
import uuid
from typing import Callable, Dict, List, Optional, Tuple

from pmaster import logsetup
from pmaster import reply as R
from pmaster.channel import (
    COMMAND_LIMIT,
    Channel,
    ChannelClosed,
    ChannelError,
    ChannelTimeout,
    LineTooLong,
    set_kernel_timeouts,
)
from pmaster.config import Config, SmtpdConfig, parse_listen, service_port
from pmaster.envelope import Envelope, Recipient, split_address
from pmaster.errors import PmasterError, RouteError, SmtpError, SpoolError
from pmaster.grammar.smtp import Command, SmtpSyntaxError, parse_command
from pmaster.policy import authres
from pmaster.policy.chain import Chain, Outcome, Resources, build_chains
from pmaster.reply import Reply
from pmaster.routing import Router, Target
from pmaster.spool import Spool

log = logging.getLogger("pmaster.smtpd")

MAX_ERRORS = 10
# SPEC 4: answered 502 5.5.1 whatever their arguments (VRFY has its own answer, 252).
NOT_IMPLEMENTED_VERBS = frozenset(("HELP", "TURN", "SEND", "SOML", "SAML", "EXPN"))
MAX_RECEIVED = 50
HEADER_SNIFF_LIMIT = 64 * 1024


class Runtime:
    """State shared by every session of every listener."""

    def __init__(self, config: Config, spool: Spool,
                 notify: Callable[[str, Optional[tuple]], None] = lambda qid, fresh=None: None):
        self.spool = spool
        self.notify = notify
        self._lock = threading.Lock()
        self._snapshot: Tuple[Config, Router] = (config, Router(config))
        self._tls: Dict[str, object] = {}
        self.sessions: Dict[int, "Session"] = {}
        self.per_ip: Dict[str, int] = {}
        self.per_listener: Dict[str, int] = {}
        self.accepting = True
        self.metrics = None  # set by the daemon: pmaster.metrics module or None
        # Policy chains per listener; resources (service connections, exec: programs) outlive reloads.
        self.resources = Resources(metrics=lambda: self.metrics)
        self._chains: Dict[str, Chain] = build_chains(config, self.resources)

    @property
    def config(self) -> Config:
        return self._snapshot[0]

    def snapshot(self) -> Tuple[Config, Router]:
        return self._snapshot

    def reload(self, config: Config) -> None:
        """Swap config and router atomically and rebuild TLS contexts; raises PmasterError on a bad cert."""
        contexts = build_tls_contexts(config)
        router = Router(config)
        chains = build_chains(config, self.resources)
        with self._lock:
            self._snapshot = (config, router)
            self._tls = contexts
            self._chains = chains

    def chain(self, ident: str) -> Chain:
        return self._chains.get(ident) or _NO_CHECKS

    def load_tls(self) -> None:
        self._tls = build_tls_contexts(self.config)

    def tls_context(self, ident: str):
        return self._tls.get(ident)

    # -- session registry and connection limits

    def register(self, session: "Session", smtpd: SmtpdConfig) -> Optional[Reply]:
        ip = session.client_address
        with self._lock:
            if not self.accepting:
                return R.SHUTTING_DOWN
            if self.per_listener.get(smtpd.ident, 0) >= smtpd.max_connections:
                return R.TOO_MANY_CONNECTIONS
            # SPEC 9: trusted clients (cron boxes, smtp-source on loopback) skip the per-IP limit.
            if self.per_ip.get(ip, 0) >= smtpd.max_connections_per_ip and not self.config.core.is_trusted(ip):
                return Reply(421, "4.7.0", "Too many connections from %s" % ip)
            self.per_listener[smtpd.ident] = self.per_listener.get(smtpd.ident, 0) + 1
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            self.sessions[id(session)] = session
        return None

    def unregister(self, session: "Session", smtpd: SmtpdConfig) -> None:
        ip = session.client_address
        with self._lock:
            if self.sessions.pop(id(session), None) is None:
                return
            self.per_listener[smtpd.ident] -= 1
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]

    def interrupt_idle_sessions(self) -> None:
        """At shutdown: sessions waiting for a command outside a transaction are told 421 now."""
        with self._lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            session.interrupt_if_idle()

    def active_sessions(self) -> int:
        with self._lock:
            return len(self.sessions)


_NO_CHECKS = Chain({})
_NO_OUTCOME = Outcome()  # read only: what a transaction no check touched decided


def build_tls_contexts(config: Config) -> Dict[str, object]:
    from pmaster.tls import server_context

    out: Dict[str, object] = {}
    for ident, smtpd in config.smtpd.items():
        if smtpd.tls_enabled:
            out[ident] = server_context(smtpd.tls_certificate, smtpd.tls_key)
    return out


# ----------------------------------------------------------------------------------------------------
# Listeners


def listen_addresses(smtpd: SmtpdConfig) -> List[Tuple[int, tuple, str]]:
    """Resolve every ``listen-port`` of a section; raises PmasterError naming what cannot be resolved."""
    out: List[Tuple[int, tuple, str]] = []
    for text in smtpd.listen_ports:
        parsed = parse_listen(text, "[%s]" % smtpd.ident if ":" in smtpd.ident else smtpd.ident)
        if parsed is None:
            raise PmasterError("[smtpd %s] listen-port %s: expected PORT, HOST:PORT or [IPV6]:PORT"
                               % (smtpd.ident, text))
        host, service = parsed
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # a bare port on an IPv6 ident ([smtpd "::1"]) comes back bracketed
        port = service_port(service)
        if port is None:
            raise PmasterError("[smtpd %s] listen-port %s: unknown service %r" % (smtpd.ident, text, service))
        for family, sockaddr in _resolve_host(host, port, smtpd.ident, text):
            label = "[%s]:%d" % (sockaddr[0], port) if family == socket.AF_INET6 else "%s:%d" % (sockaddr[0], port)
            if all(label != o[2] for o in out):
                out.append((family, sockaddr, label))
    return out


def _resolve_host(host: str, port: int, ident: str, text: str) -> List[Tuple[int, tuple]]:
    if host in ("*",):
        return [(socket.AF_INET, ("0.0.0.0", port)), (socket.AF_INET6, ("::", port, 0, 0))]
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise PmasterError("[smtpd %s] listen-port %s: cannot resolve %r: %s" % (ident, text, host, exc.strerror))
    out = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in out:
            out.append((family, sockaddr))
    return out


class Listener(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128
    block_on_close = False

    def __init__(self, runtime: Runtime, ident: str, family: int, sockaddr: tuple, label: str = ""):
        self.address_family = family
        self.runtime = runtime
        self.ident = ident
        self.label = label or str(sockaddr)
        self._pool_lock = threading.Lock()
        self._accepting = 0  # threads in (or on their way to) accept()
        self._pool_closed = False
        self._serve_done = threading.Event()
        self.preset_timeout: Optional[float] = None
        socketserver.TCPServer.__init__(self, sockaddr, _Handler, bind_and_activate=False)
        try:
            if family == socket.AF_INET6:
                # [::] and 0.0.0.0 must both bind (STYLE: IPv6 listeners set IPV6_V6ONLY).
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.server_bind()
            self.server_activate()
            self.preset_timeout = self._preset_timeouts()
        except OSError as exc:
            self.server_close()
            raise PmasterError("[smtpd %s] cannot listen on %s: %s" % (ident, self.label, exc.strerror or exc))

    def _preset_timeouts(self) -> Optional[float]:
        """Give the listening socket the command timeout as its kernel timeouts, which Linux copies to every
        accepted socket: a session then needs no setsockopt of its own (two system calls per connection)."""
        smtpd = self.runtime.config.smtpd.get(self.ident)
        if smtpd is None or not sys.platform.startswith("linux"):
            return None
        try:
            set_kernel_timeouts(self.socket, smtpd.timeout)
        except (OSError, ValueError):
            return None
        return smtpd.timeout

    def handle_error(self, request, client_address) -> None:
        log.exception("[smtpd %s] unhandled error for client %s", self.ident, client_address)

    # -- session threads: each one blocks in accept() itself, runs the session it got, and goes back to
    # accept() (at most max_idle_threads wait there). No thread hands connections over: a hand-off costs a
    # wake-up and an interpreter-lock switch per connection. A thread that takes the last waiting place
    # starts a new one first, so every connection still gets a thread at once (the registry answers 421
    # beyond the limits). Linux wakes one waiter per connection, and shutdown(SHUT_RD) on the listening
    # socket wakes them all.

    max_idle_threads = 64

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until ``shutdown()``: the calling thread is the first of the accepting threads."""
        with self._pool_lock:
            if self._pool_closed:
                return
            self._accepting += 1
        self._accept_loop()
        self._serve_done.wait()

    def shutdown(self) -> None:
        """Stop accepting (sessions already open go on) and wait until no thread is left in accept()."""
        with self._pool_lock:
            self._pool_closed = True
            self._check_done()
        try:
            self.socket.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        self._serve_done.wait(10.0)

    def _accept_loop(self) -> None:
        sock = self.socket
        while True:
            try:
                request, client_address = sock.accept()
            except OSError as exc:
                if self._leave_if_closed():
                    return
                if exc.errno == errno.EMFILE or exc.errno == errno.ENFILE or exc.errno == errno.ENOBUFS:
                    log.error("[smtpd %s] cannot accept: %s", self.ident, exc.strerror)
                    time.sleep(0.1)  # out of descriptors: give sessions time to end
                continue  # EAGAIN (the inherited SO_RCVTIMEO), EINTR, ECONNABORTED
            with self._pool_lock:
                self._accepting -= 1
                grow = self._accepting == 0 and not self._pool_closed
                if grow:
                    self._accepting += 1
                self._check_done()  # closed while this thread was accepting: it no longer counts
            if grow:
                self._start_acceptor()
            self._serve(request, client_address)
            request = client_address = None  # a waiting thread keeps nothing of its last connection
            with self._pool_lock:
                if self._pool_closed or self._accepting >= self.max_idle_threads:
                    self._check_done()
                    return
                self._accepting += 1

    def _leave_if_closed(self) -> bool:
        with self._pool_lock:
            if not self._pool_closed:
                return False
            self._accepting -= 1
            self._check_done()
            return True

    def _check_done(self) -> None:
        """With ``_pool_lock`` held: the last accepting thread of a closed listener signals ``shutdown``."""
        if self._pool_closed and self._accepting == 0:
            self._serve_done.set()

    def _start_acceptor(self) -> None:
        t = threading.Thread(target=self._accept_loop, name="smtpd:%s" % self.ident, daemon=True)
        try:
            t.start()
        except RuntimeError as exc:  # no more threads: the next connection waits for a session to end
            log.error("[smtpd %s] cannot start a session thread: %s", self.ident, exc)
            with self._pool_lock:
                self._accepting -= 1
                self._check_done()

    def _serve(self, request: socket.socket, client_address: tuple) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    @property
    def idle_threads(self) -> int:
        """Session threads waiting in accept() for the next connection."""
        with self._pool_lock:
            return self._accepting

    def shutdown_request(self, request) -> None:
        if request.fileno() < 0:
            return  # the session closed it already: shutdown() would only fail with EBADF
        socketserver.TCPServer.shutdown_request(self, request)

    def server_close(self) -> None:
        with self._pool_lock:
            self._pool_closed = True
            self._check_done()
        try:
            self.socket.shutdown(socket.SHUT_RD)  # wake the threads in accept(): they see the closed pool
        except OSError:
            pass
        socketserver.TCPServer.server_close(self)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: Listener = self.server  # type: ignore[assignment]
        threading.current_thread().name = "smtpd:%s" % server.ident
        Session(server.runtime, server.ident, self.request, self.client_address, server.preset_timeout).run()


# ----------------------------------------------------------------------------------------------------
# Session


class _Transaction:
    """One mail transaction: replaced at RSET, HELO/EHLO, STARTTLS and after DATA (aiosmtpd's Envelope)."""

    def __init__(self) -> None:
        self.mail_from: Optional[str] = None
        self.body_type = "7BIT"
        self.size_hint = 0
        self.recipients: List[Tuple[str, List[Target]]] = []  # (address as given, final targets)
        self.recipient: Optional[str] = None  # the RCPT being checked
        self.queue_id: Optional[str] = None  # at data
        self.size: Optional[int] = None  # at data: octets received
        self.headers = None  # at data: email.message.Message of the header block
        # Made on first use: a session replaces its transaction several times per message.
        self._outcome: Optional[Outcome] = None
        self._instance: Optional[str] = None

    @property
    def outcome(self) -> Outcome:
        """What the policy chain decided besides refusing (prepend, hold, discard, close hooks)."""
        if self._outcome is None:
            self._outcome = Outcome()
        return self._outcome

    @property
    def instance(self) -> str:
        """Postfix's policy ``instance``: one id per transaction."""
        if self._instance is None:
            self._instance = uuid.uuid4().hex[:16]
        return self._instance

    def close(self) -> None:
        if self._outcome is not None:
            self._outcome.close()


class SessionView:
    """Read-only view of a session for policy callables and checks (SPEC 9).

    ``size`` is the MAIL SIZE= value until the end of DATA, then the octets received; ``queue_id`` and
    ``headers`` (an ``email.message.Message`` of the header block) are set at ``data``; ``recipient`` at
    ``rcpt``. Besides SPEC 9: ``esmtp``, ``instance`` (one id per transaction) and ``hostname``.
    """

    __slots__ = ("_s",)

    def __init__(self, session: "Session"):
        object.__setattr__(self, "_s", session)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("the session view is read-only")

    listener = property(lambda self: self._s.ident)
    client_address = property(lambda self: self._s.client_address)
    client_port = property(lambda self: self._s.client_port)
    client_name = property(lambda self: self._s.client_name)
    helo = property(lambda self: self._s.helo)
    tls = property(lambda self: self._s.channel.tls if self._s.channel else None)
    mail_from = property(lambda self: self._s.tx.mail_from)
    recipients = property(lambda self: tuple(a for a, _ in self._s.tx.recipients))
    recipient = property(lambda self: self._s.tx.recipient)
    size = property(lambda self: self._s.tx.size if self._s.tx.size is not None else self._s.tx.size_hint)
    queue_id = property(lambda self: self._s.tx.queue_id)
    headers = property(lambda self: self._s.tx.headers)
    esmtp = property(lambda self: self._s.esmtp)
    instance = property(lambda self: self._s.tx.instance)
    hostname = property(lambda self: self._s.runtime.config.core.hostname)


class Session:
    def __init__(self, runtime: Runtime, ident: str, sock: socket.socket, client: tuple,
                 preset_timeout: Optional[float] = None):
        self.runtime = runtime
        self.preset_timeout = preset_timeout  # kernel timeouts the socket inherited from its listener
        self.ident = ident
        self.sock = sock
        self.client_address = client[0]
        if self.client_address.startswith("::ffff:"):
            self.client_address = self.client_address[7:]
        self.client_port = client[1]
        self.client_name = "unknown"
        self.helo: Optional[str] = None
        self.esmtp = False
        self.tx = _Transaction()
        self.errors = 0
        self.channel: Optional[Channel] = None
        self.closing = False
        self.started = time.time()
        self.log = logsetup.EventLog("pmaster.smtpd.%s" % ident)
        self.in_data = False
        self.interrupted = False
        self.refused_greeting = False  # a 5xx greeting: only QUIT is answered (RFC 5321 3.1)
        self._data_reason = "other"
        self.view = SessionView(self)

    @property
    def smtpd(self) -> SmtpdConfig:
        config = self.runtime.config
        return config.smtpd.get(self.ident) or SmtpdConfig(ident=self.ident, name=self.ident, listen_ports=())

    # -- the loop

    def run(self) -> None:
        smtpd = self.smtpd
        self.channel = Channel(self.sock, smtpd.timeout, preset=self.preset_timeout)
        refused = self.runtime.register(self, smtpd)
        try:
            if refused is not None:
                self._refused("CONNECT", refused, "limit")
                self._send(refused)
                return
            self.log.info("connect from [%s]:%s", self.client_address, self.client_port)
            self._count("connection")
            if not self._greeting(smtpd):
                return
            self._loop()
        except ChannelTimeout:
            self._send_quietly(R.TIMEOUT)
            self.log.info("timeout after %s from [%s]", "DATA" if self.in_data else "command", self.client_address)
        except ChannelClosed:
            if self.interrupted:
                self._send_quietly(R.SHUTTING_DOWN)
        except Exception:  # a broken session must never take the daemon down
            self.log.exception("session with [%s] failed", self.client_address)
            self._send_quietly(R.LOCAL_ERROR)
        finally:
            self.tx.close()
            self.runtime.unregister(self, smtpd)
            self.log.info("disconnect from [%s]", self.client_address)
            self.channel.close()

    def _greeting(self, smtpd: SmtpdConfig) -> bool:
        """Send the greeting, or the connect stage's reply instead; False when the session ends here.

        A 4xx is sent as 421 and the connection closed; a 5xx is sent as 554 and then only QUIT is
        answered (RFC 5321 3.1), every other command gets 503 until QUIT or too many errors.
        """
        reply = self._policy("connect", "CONNECT")
        if reply is None or reply.code < 400:
            self._send(Reply(220, None, reply.text if reply else "%s ESMTP Postmaster" % smtpd.name))
            return True
        if reply.code < 500:
            self._send(Reply(421, reply.enhanced or "4.7.0", reply.text))
            return False
        self._send(Reply(554, reply.enhanced, reply.text))
        self.refused_greeting = True
        return True

    def _new_tx(self) -> None:
        """Start a fresh transaction; the old one's close hooks run."""
        self.tx.close()
        self.tx = _Transaction()

    def _policy(self, stage: str, verb: str) -> Optional[Reply]:
        """Ask this listener's chain about ``stage``; a refusal is logged and counted here."""
        chain = self.runtime.chain(self.ident)
        if stage not in chain.stages:
            return None
        verdict = chain.evaluate(stage, self.view, self.tx.outcome)
        if verdict.reply is not None and verdict.reply.code >= 400:
            self._refused(verb, verdict.reply, verdict.reason)
        return verdict.reply

    def _refused(self, verb: str, reply: Reply, reason: str) -> None:
        """SPEC 6: one line per refusal, and pmaster_smtpd_rejections_total{listener,reason}."""
        tx = self.tx
        qid = tx.queue_id
        to = tx.recipient or (tx.recipients[0][0] if tx.recipients else "")  # Postfix names the first at DATA
        self.log.info("%sreject: %s from [%s]: %s; from=<%s> to=<%s> helo=<%s>", qid + ": " if qid else "",
                      verb, self.client_address, reply, tx.mail_from if tx.mail_from is not None else "",
                      to, self.helo or "")
        self._count("rejection", reason)

    def interrupt_if_idle(self) -> None:
        """Wake a session blocked waiting for a command (called from the shutdown thread).

        Only the read side is shut: the blocked read sees end of file and ``run`` still sends the 421.
        A session inside a transaction is left alone to finish it (SPEC 7); it gets 421 after it.
        """
        if self.in_data or self.tx.mail_from is not None:
            return
        self.interrupted = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _loop(self) -> None:
        while not self.closing:
            if not self.runtime.accepting and not self.in_data and self.tx.mail_from is None:
                self._send(R.SHUTTING_DOWN)
                return
            try:
                line = self.channel.readline(COMMAND_LIMIT)
            except LineTooLong:
                self._answer(R.LINE_TOO_LONG)
                continue
            self._answer(self._dispatch(line))

    def _dispatch(self, raw: bytes) -> Reply:
        text = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        if self.refused_greeting and text.split(" ", 1)[0].upper() != "QUIT":
            return R.REFUSED_AT_GREETING
        if text.split(" ", 1)[0].upper() in NOT_IMPLEMENTED_VERBS:
            return R.NOT_IMPLEMENTED  # "EXPN" without an argument too: 502 says more than a syntax error
        try:
            cmd = parse_command(text)
            handler = getattr(self, "do_" + cmd.verb.lower(), None)
            if handler is None:
                return R.NOT_IMPLEMENTED
            return handler(cmd)
        except SmtpSyntaxError as exc:
            return exc.reply
        except SmtpError as exc:
            return exc.reply

    def _answer(self, reply: Optional[Reply]) -> None:
        if reply is None:
            return
        if reply.code >= 500:
            self.errors += 1
        self.channel.write(reply.to_bytes())
        if self.errors >= MAX_ERRORS:
            self.channel.write(R.TOO_MANY_ERRORS.to_bytes())
            self.channel.flush()
            self.closing = True
            return
        if self.closing or not self.channel.has_pending_input():
            self.channel.flush()

    def _send(self, reply: Reply) -> None:
        self.channel.write(reply.to_bytes())
        self.channel.flush()

    def _send_quietly(self, reply: Reply) -> None:
        try:
            self._send(reply)
        except (ChannelError, OSError):
            pass

    def _count(self, what: str, *labels: str) -> None:
        metrics = self.runtime.metrics
        if metrics is not None:
            metrics.count(what, self.ident, *labels)

    # -- verbs

    def do_helo(self, cmd: Command) -> Reply:
        return self._greet(cmd, esmtp=False)

    def do_ehlo(self, cmd: Command) -> Reply:
        return self._greet(cmd, esmtp=True)

    def _greet(self, cmd: Command, esmtp: bool) -> Reply:
        self.helo = cmd.domain
        self.esmtp = esmtp
        self._new_tx()
        smtpd = self.smtpd
        refused = self._policy("helo", "EHLO" if esmtp else "HELO")
        if refused is not None and refused.code >= 400:
            self.helo = None
            return refused
        if not esmtp:
            return Reply(250, None, smtpd.name)
        lines = [smtpd.name, "PIPELINING", "SIZE %d" % smtpd.max_message_size, "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.channel.tls is None and self.runtime.tls_context(self.ident) is not None:
            lines.append("STARTTLS")
        return Reply(250, None, "\n".join(lines))

    def do_mail(self, cmd: Command) -> Reply:
        config, _ = self.runtime.snapshot()
        smtpd = config.smtpd.get(self.ident, self.smtpd)
        if self.helo is None:
            raise SmtpError(R.NEED_HELO)
        if self.tx.mail_from is not None:
            raise SmtpError(R.NESTED_MAIL)
        if smtpd.require_tls and self.channel.tls is None:
            raise SmtpError(R.TLS_REQUIRED)
        sender = cmd.address
        if sender.startswith("-"):
            raise SmtpError(Reply(553, "5.1.7", "<%s>: Sender address rejected: bad address syntax" % sender))
        body_type, size = self._mail_params(cmd.params, smtpd)
        if sender and not split_address(sender)[1] and smtpd.local_rcpt_to:
            sender = "%s@%s" % (sender, config.core.hostname)
        if self._free_space() < config.core.min_free_space + size:
            raise SmtpError(R.LOW_DISK)
        self._new_tx()
        self.tx.mail_from = sender
        self.tx.body_type = body_type
        self.tx.size_hint = size
        verdict = self._policy("mail", "MAIL")
        if verdict is not None and verdict.code >= 400:
            self._new_tx()
        return verdict or R.SENDER_OK

    def _mail_params(self, params: Dict[str, Optional[str]], smtpd: SmtpdConfig) -> Tuple[str, int]:
        body_type, size = "7BIT", 0
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    raise SmtpError(Reply(501, "5.5.4", "Bad SIZE parameter"))
                size = int(value)
                if size > smtpd.max_message_size:
                    raise SmtpError(R.MESSAGE_TOO_BIG)
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise SmtpError(Reply(501, "5.5.4", "Bad BODY parameter"))
                body_type = value.upper()
            else:
                raise SmtpError(Reply(555, "5.5.4", "Unsupported parameter %s" % key))
        return body_type, size

    def _free_space(self) -> int:
        try:
            return self.runtime.spool.free_space()
        except OSError:
            return 0

    def do_rcpt(self, cmd: Command) -> Reply:
        config, router = self.runtime.snapshot()
        smtpd = config.smtpd.get(self.ident, self.smtpd)
        if self.tx.mail_from is None:
            raise SmtpError(R.NEED_MAIL)
        if cmd.params:
            raise SmtpError(Reply(555, "5.5.4", "Unsupported parameter %s" % next(iter(cmd.params))))
        if len(self.tx.recipients) >= smtpd.max_recipients:
            raise SmtpError(R.TOO_MANY_RECIPIENTS)
        address = cmd.address
        local, domain = split_address(address)
        if local.startswith("-"):
            raise SmtpError(Reply(553, "5.1.3", "<%s>: Recipient address rejected: bad address syntax" % address))
        if not domain and not smtpd.local_rcpt_to and local.lower() != "postmaster":
            raise SmtpError(Reply(504, "5.5.2", "<%s>: Recipient address rejected: need fully-qualified address"
                                  % address))
        try:
            targets = router.resolve(address, smtpd.routing_table, local_rcpt_to=smtpd.local_rcpt_to)
        except RouteError as exc:
            self.tx.recipient = address
            self._refused("RCPT", exc.reply, "no_route" if exc.reply.code == 550 else "routing_error")
            self.tx.recipient = None
            raise SmtpError(exc.reply)
        if any(t.extension.startswith("-") for t in targets):
            # The extension reaches ${EXTENSION} as a word of its own: "-x" would be an option there.
            raise SmtpError(Reply(553, "5.1.3", "<%s>: Recipient address rejected: bad address extension"
                                  % address))
        if not domain:
            address = "%s@%s" % (address, config.core.hostname)
        self.tx.recipient = address
        try:
            verdict = self._policy("rcpt", "RCPT")
        finally:
            self.tx.recipient = None
        if verdict is not None and verdict.code >= 400:
            return verdict
        self.tx.recipients.append((address, targets))
        return verdict or R.RCPT_OK

    def do_data(self, cmd: Command) -> Reply:
        if self.tx.mail_from is None:
            raise SmtpError(R.NEED_MAIL)
        if not self.tx.recipients:
            raise SmtpError(R.NEED_RCPT)
        # Open the spool file before 354: a spool that cannot take a file refuses DATA itself, so the
        # client never sends a body that we would have to read as commands.
        try:
            writer = self.runtime.spool.writer()
        except SpoolError as exc:
            self.log.error("cannot store message from [%s]: %s", self.client_address, exc)
            self._new_tx()
            return R.STORAGE_FAILED
        self.in_data = True
        try:
            self._send(R.START_DATA)
            return self._receive(writer)
        except BaseException:
            writer.abort()  # a session that dies mid-DATA leaves nothing in the spool
            raise
        finally:
            self.in_data = False
            self._new_tx()

    def _receive(self, writer) -> Reply:
        config = self.runtime.config
        smtpd = config.smtpd.get(self.ident, self.smtpd)
        qid = writer.queue_id
        # A failing write must not stop the reading: the body has to be read to its final dot whatever
        # happens, or its lines would be taken for commands (SPEC 4: 452 4.3.1 and nothing left behind).
        sink = _SafeSink(writer.write)
        # Postfix puts PREPEND headers above its own Received: header.
        outcome = self.tx._outcome
        prepend = "".join(h + "\r\n" for h in outcome.prepend) if outcome is not None else ""
        sink.write((prepend + self._received_header(qid, smtpd)).encode("utf-8", "replace"))
        fixer = _HeaderFixer(sink.write, qid, config.core.hostname, smtpd.local_rcpt_to,
                             authserv_id=config.core.hostname)
        checked = "data" in self.runtime.chain(self.ident).stages
        grab = _HeaderGrab(fixer.write) if checked else None
        result = self.channel.read_data(grab.write if grab else fixer.write, smtpd.max_message_size,
                                        smtpd.bare_newline)
        fixer.close()
        self.tx.queue_id = qid
        problem = self._data_problem(result, smtpd)
        if problem is not None:
            writer.abort()
            self._refused("END-OF-MESSAGE", problem, self._data_reason)
            return problem
        error = sink.error or result.sink_error
        try:
            if error is not None:
                raise SpoolError(str(error))
            if grab is not None:
                refused = self._data_policy(grab, writer.size)
                if refused is not None:
                    writer.abort()
                    return refused
            outcome = self.tx._outcome or _NO_OUTCOME
            if outcome.discard is not None:
                writer.abort()
                self.log.info("%s: discard: END-OF-MESSAGE from [%s]: %s; from=<%s> nrcpt=%d", qid,
                              self.client_address, outcome.discard, self.tx.mail_from, len(self.tx.recipients))
                return Reply(250, "2.0.0", "Ok: queued as %s" % qid)
            env = self._envelope(qid, writer.size, smtpd)
            if outcome.hold is not None:
                env.held = True
                self.log.info("%s: hold: END-OF-MESSAGE from [%s]: %s; from=<%s>", qid, self.client_address,
                              outcome.hold, self.tx.mail_from)
            writer.commit(env)
        except SpoolError as exc:
            writer.abort()
            self.log.error("%s: cannot store message from [%s]: %s", qid, self.client_address, exc)
            return R.STORAGE_FAILED
        self.log.info("%s: from=<%s> size=%d nrcpt=%d client=[%s] helo=%s%s", qid, env.sender, env.size,
                      len(env.recipients), self.client_address, self.helo,
                      " tls=%s" % self.channel.tls.split()[0] if self.channel.tls else "")
        self._count("message", str(env.size))
        self.runtime.notify(qid, (writer.stamp, env))  # the scheduler plans from env: no read back
        return Reply(250, "2.0.0", "Ok: queued as %s" % qid)

    def _data_problem(self, result, smtpd: SmtpdConfig) -> Optional[Reply]:
        """The refusal of the end of DATA, if any; its metrics reason is left in ``_data_reason``."""
        if result.too_big:
            self._data_reason = "size"
            return R.MESSAGE_TOO_BIG
        if result.bare_newline_seen and smtpd.bare_newline == "reject":
            self._data_reason = "bare_newline"
            return R.BARE_NEWLINE
        if result.received_headers > MAX_RECEIVED:
            self._data_reason = "loop"
            return R.MAIL_LOOP
        return None

    def _data_policy(self, grab: "_HeaderGrab", size: int) -> Optional[Reply]:
        """The data stage (SPEC 9: after the final dot, before the reply); a 2xx reply is ignored."""
        self.tx.size = size
        self.tx.headers = grab.message()
        reply = self._policy("data", "END-OF-MESSAGE")
        return reply if reply is not None and reply.code >= 400 else None

    def _received_header(self, qid: str, smtpd: SmtpdConfig) -> str:
        tls = self.channel.tls
        protocol = ("ESMTPS" if tls else "ESMTP") if self.esmtp else ("SMTPS" if tls else "SMTP")
        rcpts = self.tx.recipients
        lines = ["Received: from %s (%s [%s])" % (_header_safe(self.helo or "unknown"), self.client_name,
                                                   self.client_address)]
        if tls:
            lines.append("\t(using %s)" % tls)
        by = "\tby %s (Postmaster) with %s id %s" % (smtpd.name, protocol, qid)
        # "for" only with a single recipient: naming several would disclose Bcc recipients (as Postfix does).
        if len(rcpts) == 1:
            lines += [by, "\tfor <%s>; %s" % (_header_safe(rcpts[0][0]), _date_now())]
        else:
            lines += [by + ";", "\t%s" % _date_now()]
        return "\r\n".join(lines) + "\r\n"

    def _envelope(self, qid: str, size: int, smtpd: SmtpdConfig) -> Envelope:
        recipients = []
        for original, targets in self.tx.recipients:
            for t in targets:
                recipients.append(Recipient(address=t.address, original=original, mailer=t.mailer,
                                            target=t.target, extension=t.extension))
        return Envelope(queue_id=qid, sender=self.tx.mail_from or "", recipients=recipients, arrival=time.time(),
                        size=size, helo=self.helo or "", client_address=self.client_address,
                        client_name=self.client_name, listener=self.ident, tls=self.channel.tls,
                        body_type=self.tx.body_type)

    def do_rset(self, cmd: Command) -> Reply:
        self._new_tx()
        return R.RESET_OK

    def do_noop(self, cmd: Command) -> Reply:
        return R.NOOP_OK

    def do_quit(self, cmd: Command) -> Reply:
        self.closing = True
        return R.BYE

    def do_vrfy(self, cmd: Command) -> Reply:
        return R.VRFY_CANNOT

    def do_starttls(self, cmd: Command) -> Optional[Reply]:
        context = self.runtime.tls_context(self.ident)
        if self.channel.tls is not None:
            raise SmtpError(R.TLS_ALREADY)
        if context is None:
            raise SmtpError(R.NOT_IMPLEMENTED)
        self._send(R.READY_TLS)
        self.channel.start_tls(context)  # drops plaintext that came behind STARTTLS
        self.helo = None
        self.esmtp = False
        self._new_tx()
        self._count("tls")
        self.log.info("STARTTLS from [%s]: %s", self.client_address, self.channel.tls)
        return None


_date_cache: Tuple[int, str] = (-1, "")


def _date_now() -> str:
    """RFC 5322 date of now in local time, rendered once per second (every message's Received: has one)."""
    global _date_cache
    second = int(time.time())
    cached = _date_cache
    if cached[0] != second:
        cached = _date_cache = (second, email.utils.formatdate(second, localtime=True))
    return cached[1]


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _header_safe(text: str) -> str:
    return _CONTROL.sub("?", text[:200])


class _SafeSink:
    """Forwards writes until the first failure, then drops them and keeps the error for the end of DATA."""

    def __init__(self, write: Callable[[bytes], object]):
        self._write = write
        self.error: Optional[Exception] = None

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self._write(data)
        except (SpoolError, OSError) as exc:
            self.error = exc


class _HeaderFixer:
    """Passes the body through; on local submission adds Message-ID: and Date: when the header block lacks them.

    With ``authserv_id`` it also removes Authentication-Results: fields that claim our authserv-id: only we may
    say what we verified (RFC 8601 5, SPEC 6).
    """

    def __init__(self, write: Callable[[bytes], object], qid: str, hostname: str, enabled: bool,
                 authserv_id: Optional[str] = None):
        self.out = write
        self.qid = qid
        self.hostname = hostname
        self.enabled = enabled
        self.authserv_id = authserv_id
        self.buf = bytearray()
        self.passing = not enabled and not authserv_id

    def write(self, data: bytes) -> None:
        if self.passing:
            self.out(data)
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if self.buf.startswith(b"\r\n"):
            end = 0
        if end >= 0 or len(self.buf) > HEADER_SNIFF_LIMIT:
            self._release(end if end >= 0 else len(self.buf))

    def close(self) -> None:
        if not self.passing:
            self._release(len(self.buf))

    def _release(self, header_end: int) -> None:
        if self.authserv_id:
            header_end = self._strip_forged(header_end)
        head = bytes(self.buf[:header_end]).lower()
        extra = b""
        if self.enabled and not _has_header(head, b"message-id"):
            extra += ("Message-ID: <%s.%s@%s>\r\n" % (self.qid, uuid.uuid4().hex[:12], self.hostname)).encode()
        if self.enabled and not _has_header(head, b"date"):
            extra += ("Date: %s\r\n" % _date_now()).encode()
        self.passing = True
        self.out(extra + bytes(self.buf))
        self.buf = bytearray()


    def _strip_forged(self, header_end: int) -> int:
        # Only complete lines of the header block: a field cut off at the sniff limit is left alone.
        last = self.buf.rfind(b"\r\n", 0, header_end + 2) if header_end > 0 else -1
        cut = last + 2 if last >= 0 else 0
        head = bytes(self.buf[:cut])
        if b"authentication-results" not in head.lower():
            return header_end
        kept = authres.strip_ours(head, self.authserv_id or "")
        self.buf[:cut] = kept
        return header_end - (len(head) - len(kept))


class _HeaderGrab:
    """Passes the body through and keeps a copy of its header block (up to HEADER_SNIFF_LIMIT octets)."""

    def __init__(self, write: Callable[[bytes], object]):
        self.out = write
        self.buf = bytearray()
        self.done = False

    def write(self, data: bytes) -> None:
        if not self.done:
            self.buf += data
            end = 0 if self.buf.startswith(b"\r\n") else self.buf.find(b"\r\n\r\n")
            if end >= 0 or len(self.buf) > HEADER_SNIFF_LIMIT:
                del self.buf[end if end >= 0 else HEADER_SNIFF_LIMIT:]
                self.done = True
        self.out(data)

    def message(self):
        return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(bytes(self.buf) + b"\r\n")


def _has_header(head: bytes, name: bytes) -> bool:
    return head.startswith(name + b":") or (b"\n" + name + b":") in head
