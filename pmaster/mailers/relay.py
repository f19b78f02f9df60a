"""Relay mailer: hand a message to another SMTP server (a smart host or the recipient domain's MX hosts).

API:
  ``deliver(delivery, relay, hosts, resolver, local_addresses=..., helo=None, timeouts=None, mx_port=None)
     -> List[Result]``, one ``Result`` per ``delivery.recipients``, in order. Exactly one of ``relay`` (a
     ``[relay]`` section: its ``address`` list in order, else ``name``, on ``port``) and ``hosts`` (the hosts
     of an inline ``relay(...)``; an empty tuple means the MX hosts of the recipients' domain, on ``mx_port``,
     default ``MX_PORT``) is given. Host forms: ``HOST``, ``HOST:PORT``, ``[HOST]``, ``[IPV6]:PORT``.
  ``Timeouts`` / ``TIMEOUTS``: per-step limits (RFC 5321 section 4.5.3.2); tests pass shorter ones.
  ``RefusedHosts`` / ``REFUSED``: addresses that refused (or timed out) a connection are skipped for
     ``SKIP_SECONDS``; ``REFUSED.now`` is the clock (replace it in tests).
  ``parse_host(spec, default_port) -> (host, port)``.
  ``ConnectionCache`` / ``CACHE``: idle sessions parked after a transaction for the next job to the same
     destination (Postfix's connection cache); ``close_cached()`` QUITs them all (for the daemon's shutdown;
     also registered with ``atexit``). ``CACHE.now`` is its clock (replace it in tests).
Invariants (SPEC section 5): all recipients of a delivery go in one transaction per host. The next host is
  tried only after a session-level failure (connect failure, 421, a 4xx/5xx to the greeting, EHLO/HELO, MAIL
  or AUTH, a failed required TLS), never once a recipient got its own reply. Credentials go only over TLS;
  with ``auth-user`` set and no TLS the recipients are deferred. The body is streamed from the spool file
  in chunks and dot-stuffed on the way (RFC 5321 section 4.5.2). A server that offers PIPELINING gets MAIL,
  every RCPT and DATA in one write and its replies are read in order (RFC 2920); the replies mean what they
  mean one at a time, and no text is sent when no RCPT was accepted. ``Result.reply`` is ``"CODE TEXT"`` for a
  remote reply. A destination that is one of ``local_addresses()`` defers with "mail loops back to myself".
Connection cache: a session whose transaction got its final reply (whatever the recipients' results) is
  parked instead of QUIT. It owes an ``RSET`` that must get 250 before it serves again: a pipelining server
  gets it in the same write as the next MAIL, RCPT and DATA (a non-250 answer makes the session stale: it is
  closed and the job connects afresh), any other server at parking time (a non-250 answer: not parked). The key holds everything that makes a session reusable:
  address and port, the host name (certificates are checked against it), HELO name, TLS mode and CA file,
  whether TLS is active, and the AUTH user (an authenticated session never serves another user or a job
  without AUTH, nor the reverse). A parked session idle for ``IDLE_SECONDS`` is closed; one is used for at
  most ``REUSE_LIMIT`` transactions and ``REUSE_SECONDS``; at most ``PER_DESTINATION`` idle sessions per
  address and port, ``CACHE_SIZE`` in all. A job takes a cached session before it connects, after the
  mail-loop and refused-host checks; a cached session that has hung up, or that answers MAIL with 421 or a
  broken connection, is stale: it is dropped and the job connects afresh to the same host, which is not a
  failure of that host (no next host, no refused-host memo, not counted in ``MAX_CONNECTIONS``).
Threading: ``deliver`` runs in any number of threads at once; shared state is ``REFUSED`` (locked), the TLS
  context cache (locked; contexts are used read-only) and ``CACHE`` (locked; a session is out of the cache
  while a job uses it, so no two threads ever share one). One daemon thread (``relay-cache``) runs while
  sessions are parked: it QUITs expired ones; parked sockets never keep the process from exiting.
Errors: never raises for a delivery problem (SPEC: mailers return TEMPFAIL with the reason); raises
  ``ValueError`` when called with both or neither of ``relay`` and ``hosts``. Passwords are never logged.
"""

import atexit
import base64
import dataclasses
import ipaddress
import logging
import os
import re
import select
import smtplib
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

from pmaster.channel import set_kernel_timeout
from pmaster.config import RelayConfig
from pmaster.dnsresolve import DnsTempError, NoSuchDomain, NullMX, Resolver
from pmaster.envelope import Recipient, split_address
from pmaster.mailers import OK, PERMFAIL, TEMPFAIL, Delivery, Result
from pmaster.spool import body_file_size, open_body_file

log = logging.getLogger("pmaster.relay")

SMTP_PORT = 25  # default port of inline relay(HOST) hosts
MX_PORT = 25  # port for MX delivery; tests pass mx_port (MX records cannot carry a port)
SKIP_SECONDS = 300.0  # a host that refused a connection is not tried again for this long (SPEC 5)
MAX_CONNECTIONS = 5  # connection attempts per delivery, like Postfix's smtp_mx_address_limit
CHUNK = 64 * 1024  # body bytes read and sent at a time
_TIMEOUT_SLACK = 0.05  # a failure this close to the armed timeout's end is that timeout
# Connection cache limits, after Postfix's smtp_connection_cache_time_limit and smtp_connection_reuse_*.
IDLE_SECONDS = 2.0  # a parked session unused for this long is closed
REUSE_LIMIT = 100  # transactions per connection
REUSE_SECONDS = 300.0  # age of a connection after which it is not parked again
PER_DESTINATION = 10  # idle sessions per (address, port); the scheduler's destination-concurrency default
CACHE_SIZE = 100  # idle sessions in all
REAP_SECONDS = 0.5  # how often the reaper looks for expired sessions
CLOSE_SECONDS = 2.0  # time for one batch of QUITs to expired (or, at exit, all) parked sessions
PROBE_IDLE = True  # look for a hang-up (EOF, a 421) on a cached socket before using it
# ... when it was parked at least this long. A session parked a moment ago (a busy destination) rarely hung
# up since, and if it did its next MAIL finds out and the job connects afresh (``_Stale``): the probe would
# cost every reuse a system call, and a wait for the interpreter lock, for nothing.
PROBE_AFTER = 0.5


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed for each step; defaults follow RFC 5321 section 4.5.3.2 and Postfix."""

    connect: float = 30.0
    command: float = 300.0  # greeting, EHLO, STARTTLS and handshake, AUTH, MAIL, RCPT
    data_init: float = 120.0  # reply to DATA
    data_block: float = 180.0  # each chunk of the message text
    data_end: float = 600.0  # reply after the final dot
    quit: float = 10.0
    rset: float = 20.0  # RSET before a session is parked (Postfix's smtp_rset_timeout)


TIMEOUTS = Timeouts()


class RefusedHosts:
    """Memo of ``(ip, port)`` that refused a connection: skipped until ``ttl`` seconds have passed."""

    def __init__(self, ttl: float = SKIP_SECONDS, now: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.now = now
        self._until: Dict[Tuple[str, int], float] = {}
        self._lock = threading.Lock()

    def mark(self, ip: str, port: int) -> None:
        with self._lock:
            self._until[(ip, port)] = self.now() + self.ttl

    def skipped(self, ip: str, port: int) -> bool:
        with self._lock:
            until = self._until.get((ip, port))
            if until is None:
                return False
            if self.now() >= until:
                del self._until[(ip, port)]
                return False
            return True

    def clear(self) -> None:
        with self._lock:
            self._until.clear()

    def forget(self) -> None:
        """``pmaster queue flush``: every flushed recipient is really attempted at once (SPEC 9)."""
        self.clear()


REFUSED = RefusedHosts()


# -- connection cache -------------------------------------------------------------------------------

# (ip, port, host name, HELO name, TLS mode, CA file, CA file mtime, TLS active, AUTH user)
CacheKey = Tuple[str, int, str, str, str, Optional[str], float, bool, Optional[str]]


@dataclass(eq=False)
class _Parked:
    """A live SMTP session between transactions: in the EHLO (or after-AUTH) state, no MAIL pending."""

    client: smtplib.SMTP
    born: float  # cache clock at connect
    uses: int = 0  # transactions begun on it (MAIL accepted)
    since: float = 0.0  # cache clock when parked
    rset_due: bool = False  # parked without RSET: send it (and want 250) before the next MAIL
    armed_recv: float = -1.0  # the kernel timeouts now set on its socket (SO_RCVTIMEO, SO_SNDTIMEO)
    armed_send: float = -1.0


class ConnectionCache:
    """Idle sessions by ``CacheKey``: ``take`` one out, ``put`` it back after a transaction (see the docstring).

    Expired sessions leave the cache under the lock and are QUIT by the reaper thread outside it, so a
    delivery never waits for another server's QUIT.
    """

    def __init__(self, idle: float = IDLE_SECONDS, reuse_limit: int = REUSE_LIMIT,
                 reuse_seconds: float = REUSE_SECONDS, per_destination: int = PER_DESTINATION,
                 size: int = CACHE_SIZE, now: Callable[[], float] = time.monotonic):
        self.idle = idle
        self.reuse_limit = reuse_limit
        self.reuse_seconds = reuse_seconds
        self.per_destination = per_destination
        self.size = size
        self.now = now
        self._idle: Dict[CacheKey, List[_Parked]] = {}  # most recently parked last
        self._per_dest: Dict[Tuple[str, int], int] = {}
        self._count = 0
        self._doomed: List[_Parked] = []
        self._cond = threading.Condition()
        self._reaper: Optional[threading.Thread] = None

    def __len__(self) -> int:
        with self._cond:
            return self._count

    def take(self, key: CacheKey) -> Optional[_Parked]:
        """The most recently parked live session for ``key``, now owned by the caller; None if there is none."""
        with self._cond:
            self._purge()
            stack = self._idle.get(key)
            if not stack:
                return None
            parked = stack.pop()
            self._forget(key, 1)
            return parked

    def wants(self, key: CacheKey, parked: _Parked) -> bool:
        """Whether ``put`` would keep this session now (checked before spending an RSET on it)."""
        with self._cond:
            return self._fits(key, parked)

    def put(self, key: CacheKey, parked: _Parked) -> bool:
        """Park ``parked``; False (the caller still owns and must close it) when a limit says no."""
        with self._cond:
            self._purge()
            if not self._fits(key, parked):
                return False
            if self._count >= self.size:
                self._evict_oldest()
            parked.since = self.now()
            self._idle.setdefault(key, []).append(parked)
            dest = _dest(key)
            self._per_dest[dest] = self._per_dest.get(dest, 0) + 1
            self._count += 1
            self._start_reaper()
            return True

    def close_all(self) -> None:
        """QUIT every parked session now (the daemon's shutdown; ``atexit``). The cache stays usable."""
        with self._cond:
            doomed = self._doomed + [p for stack in self._idle.values() for p in stack]
            self._doomed = []
            self._idle.clear()
            self._per_dest.clear()
            self._count = 0
            self._cond.notify_all()
        _quit_all(doomed, CLOSE_SECONDS)

    # under the lock

    def _fits(self, key: CacheKey, parked: _Parked) -> bool:
        if self.size <= 0 or parked.uses >= self.reuse_limit:
            return False
        if self.now() - parked.born >= self.reuse_seconds:
            return False
        return self._per_dest.get(_dest(key), 0) < self.per_destination

    def _forget(self, key: CacheKey, n: int) -> None:
        if not self._idle.get(key):
            self._idle.pop(key, None)
        dest = _dest(key)
        left = self._per_dest.get(dest, 0) - n
        if left > 0:
            self._per_dest[dest] = left
        else:
            self._per_dest.pop(dest, None)
        self._count -= n

    def _purge(self) -> None:
        """Move expired sessions (idle too long, or too old to serve again) to the reaper's list."""
        if not self._count:
            return
        now = self.now()
        for key in list(self._idle):
            stack = self._idle[key]
            keep = [p for p in stack if now - p.since < self.idle and now - p.born < self.reuse_seconds]
            if len(keep) == len(stack):
                continue
            self._doomed.extend(p for p in stack if p not in keep)
            self._idle[key] = keep
            self._forget(key, len(stack) - len(keep))
        if self._doomed:
            self._cond.notify_all()

    def _evict_oldest(self) -> None:
        key = min(self._idle, key=lambda k: self._idle[k][0].since)
        self._doomed.append(self._idle[key].pop(0))
        self._forget(key, 1)
        self._cond.notify_all()

    def _start_reaper(self) -> None:
        # Invariant: a reaper runs whenever a session is parked or doomed; it ends itself only under the
        # lock, when both are empty, so a put after that starts a new one.
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name="relay-cache", daemon=True)
            self._reaper.start()

    # the reaper thread

    def _reap(self) -> None:
        while True:  # ends when the cache is empty; wakes every REAP_SECONDS while it is not
            with self._cond:
                self._purge()
                doomed, self._doomed = self._doomed, []
                if not doomed:
                    if not self._count:
                        self._reaper = None
                        return
                    self._cond.wait(REAP_SECONDS)
                    continue
            _quit_all(doomed, CLOSE_SECONDS)


def _dest(key: CacheKey) -> Tuple[str, int]:
    return key[0], key[1]


CACHE = ConnectionCache()


def close_cached() -> None:
    """QUIT and close every parked relay session; the daemon calls this at shutdown (also run at exit)."""
    CACHE.close_all()


def _forget_in_child() -> None:
    # A forked child shares the parent's parked sockets: it must never QUIT them (not even at exit), and
    # the old cache's lock may have been held by a thread that does not exist in the child.
    global CACHE
    CACHE = ConnectionCache()


atexit.register(close_cached)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _quit_all(sessions: List[_Parked], budget: float) -> None:
    """Send QUIT on every session, then collect the replies, all within ``budget`` seconds; close them."""
    end = time.monotonic() + budget
    sent = []
    for p in sessions:
        if _set_timeout(p.client, end):
            try:
                p.client.putcmd("quit")
                sent.append(p)
                continue
            except (smtplib.SMTPException, OSError):
                pass
        p.client.close()
    for p in sent:
        # RFC 5321 section 4.1.1.10: the reply to QUIT, then the close; a silent server gets no more time.
        if _set_timeout(p.client, end):
            try:
                p.client.getreply()
            except (smtplib.SMTPException, OSError):
                pass
        p.client.close()


def _set_timeout(client: smtplib.SMTP, end: float) -> bool:
    left = end - time.monotonic()
    if client.sock is None or left <= 0:
        return False
    try:
        client.sock.settimeout(left)
    except OSError:
        return False
    return True


def _looks_alive(client: smtplib.SMTP) -> bool:
    """No EOF, error or unsolicited reply (a server's idle-timeout 421) is waiting on an idle session."""
    sock = client.sock
    if sock is None:
        return False
    if not PROBE_IDLE:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    try:
        if hasattr(select, "poll"):  # poll, not select: a busy daemon has descriptors above FD_SETSIZE
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return not poller.poll(0)
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _no_listeners() -> Set[Tuple[str, int]]:
    return set()


def parse_host(spec: str, default_port: int) -> Tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[HOST]``, ``[HOST]:PORT``, ``[IPV6]:PORT`` or a bare IPv6 -> (host, port)."""
    spec = spec.strip()
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise ValueError("missing ']' in %r" % spec)
        host, rest = spec[1:end], spec[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError("junk after ']' in %r" % spec)
        port = _port(rest[1:]) if rest else default_port
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
        port = _port(port_text)
    else:
        host, port = spec, default_port  # a name, an IPv4 address or a bare IPv6 address
    host = host.strip().rstrip(".")
    if not host:
        raise ValueError("empty host in %r" % spec)
    return host, port


def _port(text: str) -> int:
    text = text.strip()
    if text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        raise ValueError("bad port %r" % text) from None


# -- outcomes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    name: str  # host name for logs and certificate checks (the IP literal when given as one)
    ip: str
    port: int

    def __str__(self) -> str:
        if self.name == self.ip:
            return "[%s]:%d" % (self.ip, self.port)
        return "%s[%s]:%d" % (self.name, self.ip, self.port)


@dataclass(frozen=True)
class _Failure:
    """Why a host (or every host) could not take the message: becomes a Result for every recipient."""

    text: str
    dsn: str = ""
    permanent: bool = False
    untried: bool = False  # only skipped hosts: no connection was attempted

    def result(self) -> Result:
        result = _result(PERMFAIL if self.permanent else TEMPFAIL, self.text, self.dsn)
        return dataclasses.replace(result, tried=False) if self.untried else result


class _Final(Exception):
    """A failure that applies to every recipient at once, with no other host to try."""

    def __init__(self, failure: _Failure):
        super().__init__(failure.text)
        self.failure = failure


class _SessionFailure(Exception):
    def __init__(self, failure: _Failure):
        super().__init__(failure.text)
        self.failure = failure


class _TlsRetry(Exception):
    """Opportunistic TLS handshake failed: reconnect once and go on in plain text."""


class _Lost(Exception):
    """The connection broke or a read timed out."""


class _Deadline(Exception):
    """``Delivery.deadline`` has passed."""


class _Stale(Exception):
    """A cached session turned out dead at MAIL (a broken connection, 421, RSET not answered 250): connect afresh."""


_DEADLINE = _Failure("delivery interrupted: deadline reached (shutting down)", "4.3.2")


def _result(status: str, text: str, dsn: str = "") -> Result:
    """A Result whose enhanced status class agrees with ``status`` (a 554 greeting may end as TEMPFAIL)."""
    if not dsn:
        m = re.match(r"^\d{3}[ -]([245])\.(\d{1,3}\.\d{1,3})\b", text)
        want = {OK: "2", TEMPFAIL: "4", PERMFAIL: "5"}[status]
        if m and m.group(1) != want:
            dsn = "%s.%s" % (want, m.group(2))
    return Result(status, text, dsn)


# -- entry point ------------------------------------------------------------------------------------


def deliver(delivery: Delivery, relay: Optional[RelayConfig], hosts: Optional[Tuple[str, ...]],
            resolver: Resolver, local_addresses: Callable[[], Set[Tuple[str, int]]] = _no_listeners,
            helo: Optional[str] = None, timeouts: Optional[Timeouts] = None,
            mx_port: Optional[int] = None) -> List[Result]:
    """Send ``delivery`` by SMTP; one Result per recipient, in order (see the module docstring)."""
    if (relay is None) == (hosts is None):
        raise ValueError("relay.deliver needs exactly one of relay and hosts")
    rcpts = list(delivery.recipients)
    if not rcpts:
        return []
    job = _Job(delivery, relay, local_addresses, helo, timeouts or TIMEOUTS)
    early = job.prepare()
    if early is not None:
        return [early.result()] * len(rcpts)
    if relay is not None:
        specs = relay.addresses or (relay.name,)
        return job.run(_host_targets(specs, relay.port, resolver), rcpts)
    if hosts:
        return job.run(_host_targets(hosts, SMTP_PORT, resolver), rcpts)
    return _deliver_mx(job, rcpts, resolver, MX_PORT if mx_port is None else mx_port)


def _deliver_mx(job: "_Job", rcpts: List[Recipient], resolver: Resolver, port: int) -> List[Result]:
    # The scheduler batches by domain; grouping again keeps a mixed batch correct anyway.
    groups: Dict[str, List[int]] = {}
    for i, r in enumerate(rcpts):
        groups.setdefault(split_address(r.address)[1], []).append(i)
    results: List[Optional[Result]] = [None] * len(rcpts)
    for domain, idxs in groups.items():
        if domain:
            out = job.run(_mx_targets(domain, port, resolver), [rcpts[i] for i in idxs])
        else:
            out = [_result(PERMFAIL, "550 5.1.3 Recipient address has no domain for an MX look-up")] * len(idxs)
        for i, res in zip(idxs, out):
            results[i] = res
    return [r for r in results if r is not None]


def _host_targets(specs: Iterable[str], default_port: int, resolver: Resolver) -> Iterator[object]:
    """Targets of smart hosts in order: each name's A then AAAA records, like Postfix's ``[host]``."""
    for spec in specs:
        try:
            host, port = parse_host(spec, default_port)
        except ValueError as exc:
            yield _Failure("bad relay host: %s" % exc, "4.3.5")
            continue
        yield from _addresses(host, port, resolver)


def _addresses(host: str, port: int, resolver: Resolver) -> Iterator[object]:
    try:
        ips = resolver.addresses(host)
    except NoSuchDomain as exc:
        # A smart host or MX host that does not exist: a configuration problem there, so defer.
        yield _Failure("host %s not found: %s" % (host, exc), "4.4.4")
        return
    except DnsTempError as exc:
        yield _Failure("address look-up of %s failed: %s" % (host, exc), "4.4.3")
        return
    if not ips:
        yield _Failure("host %s has no address records" % host, "4.4.4")
    for ip in ips:
        yield _Target(host, ip, port)


def _mx_targets(domain: str, port: int, resolver: Resolver) -> Iterator[object]:
    """MX hosts of ``domain`` by preference, each host's addresses in turn (RFC 5321 section 5.1)."""
    try:
        mx = resolver.mx_hosts(domain)
    except NullMX:
        # RFC 7505 section 4.1: the sender should use 556 5.1.10 in the report.
        raise _Final(_Failure("556 5.1.10 Recipient address rejected: %s does not accept mail (null MX)"
                              % domain, permanent=True)) from None
    except NoSuchDomain as exc:
        raise _Final(_Failure("550 5.1.2 Host or domain name not found: %s" % exc, permanent=True)) from None
    except DnsTempError as exc:
        raise _Final(_Failure("MX look-up for %s failed: %s" % (domain, exc), "4.4.3")) from None
    implicit = len(mx) == 1 and mx[0][1] == domain
    for _pref, host in mx:
        for item in _addresses(host, port, resolver):
            if implicit and isinstance(item, _Failure) and item.dsn == "4.4.4":
                # The domain exists but has neither MX nor address records: nowhere to send, ever.
                raise _Final(_Failure("550 5.1.2 Host or domain name not found: %s has no MX or address "
                                      "records" % domain, permanent=True))
            yield item


# -- one delivery: hosts in turn --------------------------------------------------------------------


class _Job:
    def __init__(self, delivery: Delivery, relay: Optional[RelayConfig],
                 local_addresses: Callable[[], Set[Tuple[str, int]]], helo: Optional[str], timeouts: Timeouts):
        self.delivery = delivery
        self.qid = delivery.queue_id
        self.relay = relay
        self.timeouts = timeouts
        self.tls_mode = relay.tls if relay is not None else "opportunistic"
        self.helo = (relay.helo_name if relay is not None else None) or helo or delivery.config.core.hostname
        self.auth_user = relay.auth_user if relay is not None else None
        self.password: Optional[str] = None
        self.size = 0
        self.tls_context: Optional[ssl.SSLContext] = None
        self.tls_ca: Tuple[Optional[str], float] = (None, 0.0)  # CA file and its mtime, for the cache key
        self.local = _listeners(local_addresses())
        self.connections = 0

    def prepare(self) -> Optional[_Failure]:
        """Local checks before any connection: the body, the password, the TLS context, the sender."""
        try:
            # The record's envelope carries the body's length (SpoolWriter.commit): no read for it.
            self.size = self.delivery.envelope.size or body_file_size(self.delivery.body_path)
        except OSError as exc:
            return _Failure("cannot read the spool body: %s" % exc.strerror, "4.3.0")
        sender = self.delivery.envelope.sender
        if not _sendable(sender):
            return _Failure("553 5.6.7 Sender address cannot be sent without SMTPUTF8: %r" % sender,
                            permanent=True)
        if self.auth_user:
            failure = self._read_password()
            if failure is not None:
                return failure
        if self.tls_mode != "none":
            cafile = self.relay.tls_ca_file if self.relay is not None else None
            try:
                self.tls_ca = (cafile, os.stat(cafile).st_mtime if cafile else 0.0)
                self.tls_context = _tls_context(self.tls_mode, cafile)
            except (OSError, ssl.SSLError) as exc:
                return _Failure("cannot load tls-ca-file %s: %s" % (cafile, exc), "4.7.5")
        return None

    def _read_password(self) -> Optional[_Failure]:
        path = self.relay.auth_password_file if self.relay is not None else None
        if not path:
            return _Failure("auth-user is set without auth-password-file", "4.7.0")
        try:
            with open(path, encoding="utf-8") as f:
                self.password = f.readline().rstrip("\r\n")
        except (OSError, UnicodeError) as exc:
            # The exception text names the file, never its contents.
            return _Failure("cannot read auth-password-file %s: %s" % (path, getattr(exc, "strerror", exc)),
                            "4.7.0")
        return None

    def expired(self) -> bool:
        deadline = self.delivery.deadline
        return deadline is not None and time.monotonic() >= deadline

    def run(self, targets: Iterator[object], rcpts: List[Recipient]) -> List[Result]:
        last = _Failure("no host to deliver to", "4.4.4")
        tried_any = False
        self.connections = 0
        try:
            for item in targets:  # finite: a few hosts times a few addresses
                if self.expired():
                    return [_DEADLINE.result()] * len(rcpts)
                if isinstance(item, _Failure):
                    log.info("%s: %s", self.qid, item.text)
                    last = item
                    continue
                assert isinstance(item, _Target)
                if _loops(item.ip, item.port, self.local):
                    log.warning("%s: %s is one of our own listeners: mail loops back to myself", self.qid, item)
                    return [_result(TEMPFAIL, "mail for %s loops back to myself" % item, "4.4.6")] * len(rcpts)
                if REFUSED.skipped(item.ip, item.port):
                    last = _Failure("%s refused a connection less than %d s ago; not tried"
                                    % (item, REFUSED.ttl), "4.4.1", untried=not tried_any)
                    continue
                if self.connections >= MAX_CONNECTIONS:
                    break
                tried_any = True
                outcome = self.attempt(item, rcpts)
                if isinstance(outcome, list):
                    return outcome
                log.info("%s: %s", self.qid, outcome.text)
                last = outcome
        except _Final as final:
            return [final.failure.result()] * len(rcpts)
        return [last.result()] * len(rcpts)

    def cache_key(self, target: _Target, tls: bool) -> CacheKey:
        return (target.ip, target.port, target.name, self.helo, self.tls_mode, self.tls_ca[0], self.tls_ca[1],
                tls, self.auth_user)

    def attempt(self, target: _Target, rcpts: List[Recipient]) -> Union[List[Result], _Failure]:
        parked = self.take_cached(target)
        if parked is not None:
            try:
                return self.drive(_Session(self, parked.client, target, rcpts, parked, reused=True),
                                  _Session.reuse)
            except _Stale as exc:
                # The server dropped the idle session: not a failure of the host, so connect afresh.
                log.debug("%s: cached session with %s is stale (%s); connecting again", self.qid, target, exc)
        try:
            return self.session(target, rcpts, try_tls=True)
        except _TlsRetry as exc:
            if self.auth_user:
                return _Failure("TLS handshake with %s failed (%s): not sending credentials in plain text"
                                % (target, exc), "4.7.5")
            log.info("%s: TLS handshake with %s failed (%s); retrying without TLS", self.qid, target, exc)
        try:
            return self.session(target, rcpts, try_tls=False)
        except _TlsRetry as exc:  # cannot happen without STARTTLS; be safe anyway
            return _Failure("TLS failure with %s: %s" % (target, exc), "4.7.5")

    def take_cached(self, target: _Target) -> Optional[_Parked]:
        """A parked session fit for this job and target (TLS first where TLS is possible), or None."""
        tls_states = {"none": (False,), "required": (True,)}.get(self.tls_mode, (True, False))
        for tls in tls_states:
            key = self.cache_key(target, tls)
            for _ in range(PER_DESTINATION + 1):  # bounded: skip the ones that hung up while idle
                parked = CACHE.take(key)
                if parked is None:
                    break
                if CACHE.now() - parked.since < PROBE_AFTER or _looks_alive(parked.client):
                    return parked
                log.debug("%s: cached session with %s has hung up", self.qid, target)
                parked.client.close()
        return None

    def session(self, target: _Target, rcpts: List[Recipient], try_tls: bool) -> Union[List[Result], _Failure]:
        self.connections += 1
        client = smtplib.SMTP(local_hostname=self.helo)
        try:
            client.sock = _connect(target, self.timeouts.connect, self.delivery.deadline)
        except OSError as exc:
            client.close()
            if self.expired():
                return [_DEADLINE.result()] * len(rcpts)
            REFUSED.mark(target.ip, target.port)
            return _Failure("connect to %s: %s" % (target, _strerror(exc)), "4.4.1")
        sess = _Session(self, client, target, rcpts, _Parked(client, CACHE.now()))
        return self.drive(sess, lambda s: s.run(try_tls))

    def drive(self, sess: "_Session", step: Callable[["_Session"], List[Result]]) -> Union[List[Result], _Failure]:
        """Run ``step`` on ``sess``; the session is closed afterwards unless ``step`` parked it."""
        try:
            return step(sess)
        except _SessionFailure as exc:
            return exc.failure
        except _Deadline:
            return [_DEADLINE.result()] * len(sess.rcpts)
        finally:
            if not sess.parked:
                sess.client.close()


def _connect(target: _Target, timeout: float, deadline: Optional[float]) -> socket.socket:
    if deadline is not None:
        timeout = min(timeout, max(0.001, deadline - time.monotonic()))
    sock = socket.create_connection((target.ip, target.port), timeout)
    # Every command and message end is one write followed by a wait for the reply, so Nagle's algorithm
    # only adds a delayed-ACK stall (~40 ms on Linux) when a write leaves a small segment behind unacknowledged
    # data (a TLS record split, the tail of a chunk). Postfix turns it off too (vstream_tweak_tcp).
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    return sock


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "connection timed out"
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__


def _sendable(address: str) -> bool:
    """Plain ASCII without line breaks or angle brackets: what fits a MAIL/RCPT path without SMTPUTF8."""
    try:
        address.encode("ascii")
    except UnicodeError:
        return False
    return not any(c in address for c in "\r\n<>")


# -- one SMTP session -------------------------------------------------------------------------------


class _Session:
    def __init__(self, job: _Job, client: smtplib.SMTP, target: _Target, rcpts: List[Recipient],
                 conn: _Parked, reused: bool = False):
        self.job = job
        self.client = client
        self.target = target
        self.rcpts = rcpts
        self.t = job.timeouts
        self.conn = conn  # the connection's life: age and transactions, carried through the cache
        # Taken from the cache (even one parked before any MAIL was accepted, after a SIZE refusal): a 421
        # to MAIL then means the server dropped an idle session, not that the host fails.
        self.reused = reused
        self.tls = False
        self.clean = False  # the last command got its final reply and no transaction is open: parkable
        self.rcpts_answered = False  # some RCPT of this transaction got its own reply: no next host now
        self.parked = False
        self.armed_until = 0.0  # time.monotonic() when the timeout armed last runs out

    # low-level steps

    def arm(self, seconds: float, sending: bool = False) -> None:
        """Time limit for the next step: reading a reply, or with ``sending`` writing message data."""
        deadline = self.job.delivery.deadline
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Deadline()
            seconds = min(seconds, left)
        sock = self.client.sock
        if sock is None:
            raise _Lost("connection closed")
        self.armed_until = time.monotonic() + seconds
        if isinstance(sock, ssl.SSLSocket):
            # Python's ssl retries a blocking read that the kernel timed out, forever: Python timeouts here.
            if sock.gettimeout() != seconds:
                sock.settimeout(seconds)
            return
        # Kernel timeouts on a blocking socket, each set only when it changes: Python's own socket timeout
        # costs a poll() before every read and write and an ioctl per change. Reads (replies) and writes
        # (message data) have separate ones; a command is too short to wait for room to write it, so its
        # write runs under the data timeout.
        if sock.gettimeout() is not None:
            sock.settimeout(None)
        conn = self.conn
        try:
            # Commands write under the data timeout, capped by the deadline (when shutting down).
            value = seconds if sending else self.t.data_block if deadline is None else min(self.t.data_block, left)
            if conn.armed_send != value:
                set_kernel_timeout(sock, socket.SO_SNDTIMEO, value)
                conn.armed_send = value
            if not sending and conn.armed_recv != seconds:
                set_kernel_timeout(sock, socket.SO_RCVTIMEO, seconds)
                conn.armed_recv = seconds
        except (OSError, ValueError) as exc:
            raise _Lost(_strerror(exc)) from None

    def call(self, seconds: float, fn: Callable, *args) -> Tuple[int, str]:
        """Run one smtplib step with a timeout; returns (code, "CODE TEXT")."""
        self.arm(seconds)
        try:
            code, msg = fn(*args)
        except (smtplib.SMTPException, OSError) as exc:
            if self.job.expired():
                raise _Deadline() from None
            raise _Lost(self.timed_out() or _lost_text(exc)) from None
        return code, _reply_text(code, msg)

    def timed_out(self) -> str:
        """"timed out" once the armed timeout has run out: a kernel timeout shows as EAGAIN, or as an end of
        file through smtplib's reader, not as ``socket.timeout``."""
        return "timed out" if time.monotonic() >= self.armed_until - _TIMEOUT_SLACK else ""

    def cmd(self, seconds: float, verb: str, args: str = "") -> Tuple[int, str]:
        return self.call(seconds, self.client.docmd, verb, args)

    def fail(self, text: str, stage: str, dsn: str = "", permanent: bool = False) -> _SessionFailure:
        return _SessionFailure(_Failure("%s (%s, %s)" % (text, self.target, stage), dsn, permanent))

    def lost(self, exc: _Lost, stage: str) -> _SessionFailure:
        return self.fail("lost connection: %s" % exc, stage, "4.4.2")

    # the dialogue

    def run(self, try_tls: bool) -> List[Result]:
        try:
            self.greeting()
            self.hello()
            tls = self.tls = self.starttls() if try_tls and self.job.tls_mode != "none" else False
            if self.job.tls_mode == "required" and not tls:
                raise self.fail("TLS is required but was not negotiated", "before MAIL", "4.7.5")
            if self.job.auth_user:
                self.authenticate(tls)
        except _Lost as exc:
            raise self.lost(exc, "before MAIL") from None
        return self.deliver(lambda exc: self.lost(exc, "in reply to MAIL FROM"))

    def reuse(self) -> List[Result]:
        """The dialogue on a cached session: straight to MAIL; a dead session raises ``_Stale``."""
        self.tls = isinstance(self.client.sock, ssl.SSLSocket)
        log.debug("%s: reusing the session with %s (transaction %d)", self.job.qid, self.target,
                  self.conn.uses + 1)
        return self.deliver(lambda exc: _Stale(str(exc)))

    def deliver(self, on_lost_mail: Callable[[_Lost], Exception]) -> List[Result]:
        """From MAIL on, on a fresh or a reused session; ``on_lost_mail`` says what a dead MAIL means."""
        too_big = self.check_size()
        if too_big is not None:
            self.clean = True
            self.finish()
            return [too_big] * len(self.rcpts)
        if self.client.has_extn("pipelining") and any(_sendable(r.address) for r in self.rcpts):
            results = self.pipelined(on_lost_mail)
        else:
            try:
                if self.conn.rset_due:
                    self.rset_reply(self.cmd(self.t.rset, "RSET"))
                self.mail()
            except _Lost as exc:
                raise on_lost_mail(exc) from None
            results = self.transaction()
        self.finish()
        return results

    def finish(self) -> None:
        """Park the session for the next job when it is clean and the cache wants it; else QUIT."""
        if self.clean and self.park():
            return
        if self.client.sock is not None:
            self.quit()

    def park(self) -> bool:
        key = self.job.cache_key(self.target, self.tls)
        if not CACHE.wants(key, self.conn):
            return False
        if self.client.has_extn("pipelining"):
            # The RSET goes in the same write as the next MAIL, RCPT and DATA: no round trip of its own.
            self.conn.rset_due = True
            self.parked = CACHE.put(key, self.conn)
            return self.parked
        try:
            code, text = self.cmd(self.t.rset, "RSET")
        except (_Lost, _Deadline) as exc:
            log.debug("%s: RSET to %s failed (%s): not caching the session", self.job.qid, self.target, exc)
            self.client.close()
            return False
        if code != 250:
            # Postfix too: a server that does not answer RSET with 250 may not be in a clean state.
            log.debug("%s: %s answered RSET with %s: not caching the session", self.job.qid, self.target, text)
            return False
        self.parked = CACHE.put(key, self.conn)
        return self.parked

    def greeting(self) -> None:
        code, text = self.call(self.t.command, self.client.getreply)
        if code != 220:
            raise self.fail(text, "greeting", permanent=False)

    def hello(self) -> None:
        code, text = self.call(self.t.command, self.client.ehlo, self.job.helo)
        if 200 <= code < 300:
            return
        if code < 500:
            raise self.fail(text, "in reply to EHLO")
        # RFC 5321 section 3.2: a server that does not know EHLO answers 5xx; fall back to HELO.
        code, text = self.call(self.t.command, self.client.helo, self.job.helo)
        if not 200 <= code < 300:
            raise self.fail(text, "in reply to HELO")

    def starttls(self) -> bool:
        required = self.job.tls_mode == "required"
        if not self.client.has_extn("starttls"):
            if required:
                raise self.fail("TLS is required but the server does not offer STARTTLS", "after EHLO", "4.7.4")
            return False
        code, text = self.cmd(self.t.command, "STARTTLS")
        if code == 421 or (code != 220 and required):
            raise self.fail(text, "in reply to STARTTLS", "4.7.4" if code != 421 else "")
        if code != 220:
            return False  # opportunistic: the session is still in its EHLO state, go on in plain text
        self.handshake(required)
        # RFC 3207 section 4.2: forget what the server said before TLS and say EHLO again.
        self.client.file = None
        self.client.helo_resp = None
        self.client.ehlo_resp = None
        self.client.esmtp_features = {}
        self.client.does_esmtp = False
        self.hello()
        return True

    def handshake(self, required: bool) -> None:
        ctx = self.job.tls_context
        assert ctx is not None
        self.arm(self.t.command)
        self.client.sock.settimeout(self.t.command)  # TLS sockets keep Python timeouts (see ``arm``)
        try:
            self.client.sock = ctx.wrap_socket(self.client.sock, server_hostname=self.target.name)
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            if self.job.expired():
                raise _Deadline() from None
            if required:
                raise self.fail("TLS handshake failed: %s" % _ssl_reason(exc), "STARTTLS", "4.7.5") from None
            raise _TlsRetry(_ssl_reason(exc)) from None
        log.debug("%s: TLS with %s: %s %s", self.job.qid, self.target, self.client.sock.version(),
                  self.client.sock.cipher()[0] if self.client.sock.cipher() else "")

    def authenticate(self, tls: bool) -> None:
        user, password = self.job.auth_user or "", self.job.password or ""
        if not tls:
            raise self.fail("TLS is not active: not sending credentials in plain text", "before AUTH", "4.7.0")
        mechanisms = self.client.esmtp_features.get("auth", "").upper().split()
        if "PLAIN" in mechanisms:
            blob = _b64("\0%s\0%s" % (user, password))
            code, text = self.cmd(self.t.command, "AUTH", "PLAIN " + blob)
            if code == 334:  # a server that ignores the initial response asks for it
                code, text = self.cmd(self.t.command, blob)
        elif "LOGIN" in mechanisms:
            code, text = self.cmd(self.t.command, "AUTH", "LOGIN")
            if code == 334:
                code, text = self.cmd(self.t.command, _b64(user))
            if code == 334:
                code, text = self.cmd(self.t.command, _b64(password))
        else:
            raise self.fail("the server offers neither AUTH PLAIN nor AUTH LOGIN", "after EHLO", "4.7.0")
        if code != 235:
            raise self.fail(text, "in reply to AUTH as %s" % user, "4.7.0" if code < 500 else "4.7.8")
        log.debug("%s: authenticated to %s as %s", self.job.qid, self.target, user)

    def check_size(self) -> Optional[Result]:
        limit = self.client.esmtp_features.get("size", "")
        if not limit.isdigit() or int(limit) == 0 or self.job.size <= int(limit):
            return None
        # RFC 1870 section 6: the message can never be accepted there.
        return _result(PERMFAIL, "552 5.3.4 Message size %d exceeds the size limit %s of %s"
                       % (self.job.size, limit, self.target))

    def mail_args(self) -> str:
        env = self.job.delivery.envelope
        params = ""
        if self.client.has_extn("size"):
            params += " SIZE=%d" % self.job.size
        if env.body_type.upper() == "8BITMIME" and self.client.has_extn("8bitmime"):
            params += " BODY=8BITMIME"
        return "FROM:<%s>%s" % (env.sender, params)

    def mail(self) -> None:
        self.mail_reply(*self.cmd(self.t.command, "MAIL", self.mail_args()))

    def mail_reply(self, code: int, text: str) -> None:
        if code == 421 and self.reused:
            raise _Stale(text)
        if not 200 <= code < 300:
            raise self.fail(text, "in reply to MAIL FROM", permanent=code >= 500 and code != 421)
        self.conn.uses += 1

    def transaction(self) -> List[Result]:
        """RCPT for each recipient, then DATA: from the first per-recipient reply on, no other host."""
        results, sendable = self.unsendable()
        accepted: List[int] = []
        self.rcpts_answered = False
        for i in sendable:
            stop = self.rcpt_reply(results, accepted, i,
                                   lambda i=i: self.cmd(self.t.command, "RCPT", "TO:<%s>" % self.rcpts[i].address))
            if stop is not None:
                return stop
        if accepted:
            self.data(results, accepted)
        else:
            self.clean = True  # every RCPT answered (none with 421): RSET ends the transaction
        return _fill(results, "no reply")

    def unsendable(self) -> Tuple[List[Optional[Result]], List[int]]:
        """Results so far (refusals of what cannot be sent) and the indexes of the recipients to send."""
        results: List[Optional[Result]] = [None] * len(self.rcpts)
        sendable = []
        for i, rcpt in enumerate(self.rcpts):
            if _sendable(rcpt.address):
                sendable.append(i)
            else:
                results[i] = _result(PERMFAIL, "553 5.6.7 Recipient address cannot be sent without SMTPUTF8")
        return results, sendable

    def rcpt_reply(self, results: List[Optional[Result]], accepted: List[int], i: int,
                   read: Callable[[], Tuple[int, str]]) -> Optional[List[Result]]:
        """Take the reply to recipient ``i``'s RCPT; the final results when the transaction cannot go on."""
        answered = self.rcpts_answered
        try:
            code, text = read()
        except _Lost as exc:
            if not answered:
                raise self.lost(exc, "in reply to RCPT TO") from None
            return _fill(results, "lost connection: %s (%s, in reply to RCPT TO)" % (exc, self.target))
        except _Deadline:
            if not answered:
                raise
            return _fill(results, _DEADLINE.text, _DEADLINE.dsn)
        if code == 421 and not answered:
            raise self.fail(text, "in reply to RCPT TO")
        if code == 421:
            return _fill(results, text)
        self.rcpts_answered = True
        if 200 <= code < 300:
            accepted.append(i)
        else:
            results[i] = _result(PERMFAIL if code >= 500 else TEMPFAIL, text)
        return None

    def pipelined(self, on_lost_mail: Callable[[_Lost], Exception]) -> List[Result]:
        """RFC 2920: MAIL, every RCPT and DATA in one write, then their replies in order (two round trips
        fewer per message than one command at a time)."""
        results, sendable = self.unsendable()
        try:
            body = open_body_file(self.job.delivery.body_path)
        except OSError as exc:
            self.clean = True  # nothing sent: the session is as clean as it was
            return _fill(results, "cannot read the spool body: %s" % exc.strerror, "4.3.0")
        with body:
            lines = ["MAIL " + self.mail_args()] + ["RCPT TO:<%s>" % self.rcpts[i].address for i in sendable]
            rset = self.conn.rset_due
            try:
                self.arm(self.t.data_block, sending=True)  # the replies arm their own timeouts
                self.client.send("".join(line + "\r\n" for line in (["RSET"] if rset else []) + lines + ["DATA"]))
            except _Lost as exc:
                raise on_lost_mail(exc) from None
            except (smtplib.SMTPException, OSError) as exc:
                raise on_lost_mail(_Lost(self.timed_out() or _lost_text(exc))) from None
            # The group's replies come together: one receive timeout serves them all (the longest of
            # theirs, as RFC 5321 section 4.5.3.2 gives minimums), one setsockopt instead of one per reply.
            group = max(self.t.command, self.t.data_init, self.t.rset if rset else 0.0)
            try:
                if rset:
                    self.rset_reply(self.call(group, self.client.getreply))
                code, text = self.call(group, self.client.getreply)
            except _Lost as exc:
                raise on_lost_mail(exc) from None
            self.mail_reply(code, text)
            accepted: List[int] = []
            self.rcpts_answered = False
            for i in sendable:
                stop = self.rcpt_reply(results, accepted, i, lambda: self.call(group, self.client.getreply))
                if stop is not None:
                    return stop
            try:
                reply = self.call(group, self.client.getreply)
            except _Lost as exc:
                return _fill(results, "lost connection: %s (%s, in reply to DATA)" % (exc, self.target), "4.4.2")
            except _Deadline:
                return _fill(results, _DEADLINE.text, _DEADLINE.dsn)
            if accepted:
                self.data(results, accepted, body, reply)
            elif reply[0] == 354:
                self.end_empty_message()
            else:
                self.clean = reply[0] != 421  # every RCPT refused and DATA too: RSET ends the transaction
        return _fill(results, "no reply")

    def rset_reply(self, reply: Tuple[int, str]) -> None:
        """The reply to the RSET owed by a session parked without one: anything but 250 makes it stale."""
        self.conn.rset_due = False
        if reply[0] != 250:
            # Postfix too: a server that does not answer RSET with 250 may not be in a clean state. What was
            # pipelined behind it is abandoned with the connection (closed, no QUIT: DATA may be open).
            log.debug("%s: %s answered RSET with %s: connecting afresh", self.job.qid, self.target, reply[1])
            raise _Stale("RSET answered %s" % reply[1])

    def end_empty_message(self) -> None:
        """DATA got 354 although every RCPT was refused (RFC 2920 section 3.1): end the empty text at once."""
        try:
            self.sendall(b".\r\n")
            code, _ = self.call(self.t.data_end, self.client.getreply)
        except (_Lost, _Deadline):
            return
        self.clean = code != 421

    def data(self, results: List[Optional[Result]], accepted: List[int], body=None,
             reply: Optional[Tuple[int, str]] = None) -> None:
        """DATA and the message text for ``accepted``; ``reply`` is DATA's reply when DATA went pipelined."""
        def settle(status: str, text: str, dsn: str = "") -> None:
            for i in accepted:
                results[i] = _result(status, text, dsn)

        if body is None:
            try:
                body = open_body_file(self.job.delivery.body_path)
            except OSError as exc:
                settle(TEMPFAIL, "cannot read the spool body: %s" % exc.strerror, "4.3.0")
                return
        with body:
            try:
                code, text = reply if reply is not None else self.cmd(self.t.data_init, "DATA")
                if code != 354:
                    self.clean = code != 421
                    settle(PERMFAIL if code >= 500 else TEMPFAIL, text)
                    return
                self.send_body(body)
                code, text = self.call(self.t.data_end, self.client.getreply)
                self.clean = code != 421
            except _Lost as exc:
                settle(TEMPFAIL, "lost connection: %s (%s, while sending the message)" % (exc, self.target),
                       "4.4.2")
                return
            except _Deadline:
                settle(TEMPFAIL, _DEADLINE.text, _DEADLINE.dsn)
                return
        if 200 <= code < 300:
            settle(OK, text)
        else:
            settle(PERMFAIL if code >= 500 else TEMPFAIL, text)

    def send_body(self, body) -> None:
        """Stream the dot-unstuffed CRLF body, dot-stuffing it (RFC 5321 section 4.5.2), then the final dot.

        The final dot goes out in one write with the last chunk: as a write of its own it would be a small
        segment behind unacknowledged data, and a server that delays its ACK would then hold up the reply.
        """
        at_line_start = True
        pending = b""  # one stuffed chunk held back until we know whether it is the last
        for _ in range(1 << 40):  # bounded by the file size; the range only makes the bound explicit
            try:
                chunk = body.read(CHUNK)
            except OSError as exc:
                # Hang up without the final dot, so the server discards the partial message.
                self.client.close()
                raise _Lost("cannot read the spool body: %s" % exc.strerror) from None
            if not chunk:
                break
            stuffed = chunk.replace(b"\n.", b"\n..")
            if at_line_start and chunk.startswith(b"."):
                stuffed = b"." + stuffed
            at_line_start = chunk.endswith(b"\n")
            if pending:
                self.sendall(pending)
            pending = stuffed
        self.sendall(pending + (b".\r\n" if at_line_start else b"\r\n.\r\n"))

    def sendall(self, data: bytes) -> None:
        self.arm(self.t.data_block, sending=True)
        try:
            self.client.sock.sendall(data)  # type: ignore[union-attr]
        except OSError as exc:
            if self.job.expired():
                raise _Deadline() from None
            raise _Lost(self.timed_out() or _strerror(exc)) from None

    def quit(self) -> None:
        try:
            self.arm(self.t.quit)
            self.client.docmd("QUIT")
        except (smtplib.SMTPException, OSError, _Lost, _Deadline):
            pass  # the mail is settled either way


def _fill(results: List[Optional[Result]], text: str, dsn: str = "") -> List[Result]:
    """Recipients without a final answer yet are deferred with ``text``."""
    if not dsn and not text[:1].isdigit():
        dsn = "4.4.2"
    return [r if r is not None else _result(TEMPFAIL, text, dsn) for r in results]


def _reply_text(code: int, msg: bytes) -> str:
    text = " ".join(line.strip() for line in msg.decode("utf-8", "replace").split("\n")).strip()
    if code < 0:
        return "unparsable reply: %s" % (text or "(empty)")
    return "%d %s" % (code, text) if text else str(code)


def _lost_text(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return re.sub(r"^Connection unexpectedly closed: ", "", text)


def _ssl_reason(exc: BaseException) -> str:
    return getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc) or "handshake failed"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


# -- TLS contexts -----------------------------------------------------------------------------------

_contexts: Dict[Tuple[str, Optional[str], float], ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


def _tls_context(mode: str, cafile: Optional[str]) -> ssl.SSLContext:
    """One client context per (mode, CA file, its mtime): a changed CA file gives a new context."""
    mtime = os.stat(cafile).st_mtime if cafile else 0.0
    key = (mode, cafile, mtime)
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = _new_context(mode, cafile)
            _contexts[key] = ctx
        return ctx


def _new_context(mode: str, cafile: Optional[str]) -> ssl.SSLContext:
    if mode == "required":
        # Verify the chain (system store, or only tls-ca-file when given) and the host name.
        ctx = ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx
    # Opportunistic: encryption against passive listeners only, so any certificate will do.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- mail loops -------------------------------------------------------------------------------------


def _listeners(addresses: Iterable[Tuple[str, int]]) -> Set[Tuple[str, int]]:
    out = set()
    for host, port in addresses:
        out.add((_norm_ip(host), int(port)))
    return out


def _norm_ip(host: str) -> str:
    host = host.strip().strip("[]")
    if host in ("", "*"):
        return "0.0.0.0"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower()
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def _loops(ip: str, port: int, listeners: Set[Tuple[str, int]]) -> bool:
    """True when ``ip:port`` reaches one of our listeners (also through a wildcard listener)."""
    if not listeners:
        return False
    ip = _norm_ip(ip)
    if (ip, port) in listeners:
        return True
    if ("0.0.0.0", port) not in listeners and ("::", port) not in listeners:
        return False
    return _is_local_ip(ip)


def _is_local_ip(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_loopback or addr.is_unspecified:
        return True
    # An address this machine owns is one we can bind to.
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True
