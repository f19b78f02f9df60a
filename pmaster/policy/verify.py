"""Recipient verification (callouts) at RCPT: ask the ``[relay]`` a recipient is routed to before accepting it.

API:
  ``VerifyCache(size=10000, now=time.monotonic)``: verdicts by (relay, address): an accepted address for
     ``POSITIVE_TTL`` (a day), a refused one for ``NEGATIVE_TTL`` (an hour); the least recently used go first.
  ``Probe(relay, helo, timeout)``: one SMTP session with a relay: its hosts in order (``address`` lines, else
     ``name``; ``port``), STARTTLS per ``tls`` (``required`` verifies the chain against ``tls-ca-file`` or the
     system store, and the host name), ``EHLO helo`` (HELO fallback), ``MAIL FROM:<>``; then ``rcpt(address)``
     for each recipient, never DATA; ``close()`` sends QUIT.
  ``VerifyCheck(relays, resolve, cache, helo, timeout=30.0)``: a chain ``Check`` for the ``rcpt`` stage. For each
     final target of the recipient (``resolve(address) -> [Target]``) whose ``[relay]`` has
     ``verify-recipients = yes``: a refusal (5xx) answers ``550 5.1.1`` with the relay's text; a 4xx, no answer or
     no reachable host answers ``450 4.1.1``.
  ``checks(smtpd, config, resources) -> [VerifyCheck]``: the chain factory (``FACTORIES["verify"]``); none
     when no ``[relay]`` has ``verify-recipients = yes``. Targets come from the listener's routing table; the
     cache is one per daemon (in ``resources``); a probe step may take 30 s, at most half the listener's
     ``timeout``; the HELO name is the relay's ``helo-name``, else ``[core] hostname``.
Invariants: one probe session per relay per transaction, opened at the first RCPT that needs it and closed
  (QUIT) when the transaction ends (``Outcome.on_close``); a session that failed is not opened again in the same
  transaction (its later RCPTs answer 450 at once). Only definite answers are cached (2xx, 5xx), never a 4xx or
  a failure. ``timeout`` bounds each probe step and the opening of a session in all.
Threading: a ``VerifyCheck`` and its cache are shared by every session; probes belong to one transaction, so to
  one session thread; the table of open probes and the cache each have a lock.
Errors: none escape ``check``; network trouble becomes 450 4.1.1 and a log line.
"""

import logging
import smtplib
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from pmaster.config import RelayConfig, split_hostport
from pmaster.policy.authres import header_safe
from pmaster.policy.chain import Check, Resources
from pmaster.policy.ttlcache import TtlCache
from pmaster.reply import Reply
from pmaster.routing import Router

log = logging.getLogger("pmaster.policy.verify")

POSITIVE_TTL = 86400
NEGATIVE_TTL = 3600
CACHE_SIZE = 10000
QUIT_TIMEOUT = 2.0


@dataclass(frozen=True)
class Verdict:
    code: int  # the relay's reply code; 0 when there was no answer
    text: str  # the relay's reply text, or why there was none

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def refused(self) -> bool:
        return self.code >= 500


class VerifyCache(TtlCache):
    def __init__(self, size: int = CACHE_SIZE, now: Callable[[], float] = time.monotonic):
        super().__init__(size, now)

    def get(self, relay: str, address: str) -> Optional[Verdict]:  # type: ignore[override]
        return TtlCache.get(self, (relay, address.lower()))

    def put(self, relay: str, address: str, verdict: Verdict) -> None:
        if verdict.accepted:
            ttl = POSITIVE_TTL
        elif verdict.refused:
            ttl = NEGATIVE_TTL
        else:
            return  # a 4xx or no answer says nothing lasting about the address
        self.store((relay, address.lower()), verdict, ttl)


class _ProbeFailed(Exception):
    pass


class Probe:
    def __init__(self, relay: RelayConfig, helo: str, timeout: float):
        self.relay = relay
        self.helo = relay.helo_name or helo
        self.timeout = float(timeout)
        self.client: Optional[smtplib.SMTP] = None
        self.peer = ""
        self.failure: Optional[str] = None  # set once the session failed: no second try in this transaction

    def hosts(self) -> Iterator[Tuple[str, int]]:
        for spec in self.relay.addresses or (self.relay.name,):
            parsed = split_hostport(spec)
            if parsed is None:
                continue
            host, port = parsed
            if not port:
                yield host, self.relay.port
            elif port.isdigit():
                yield host, int(port)
            else:
                yield host, socket.getservbyname(port, "tcp")  # OSError for an unknown service

    def rcpt(self, address: str) -> Verdict:
        if self.failure is None and self.client is None:
            self._open()
        if self.client is None:
            return Verdict(0, self.failure or "no session")
        try:
            self.client.sock.settimeout(self.timeout)
            code, msg = self.client.rcpt(address)
        except (OSError, smtplib.SMTPException, UnicodeError) as exc:  # UnicodeError: a non-ASCII address
            self._fail("%s: no answer to RCPT TO: %s" % (self.peer, _why(exc)))
            return Verdict(0, self.failure or "")
        if code == 421:
            self._fail("%s: 421 %s" % (self.peer, _text(msg)))
        return Verdict(code, _text(msg))

    def close(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if client.sock is not None:
                client.sock.settimeout(QUIT_TIMEOUT)
            client.quit()
        except (OSError, smtplib.SMTPException):
            pass
        finally:
            client.close()

    # -- opening

    def _open(self) -> None:
        deadline = time.monotonic() + self.timeout
        reasons: List[str] = []
        try:
            hosts = list(self.hosts())
        except OSError as exc:
            hosts = []
            reasons.append("bad port: %s" % exc)
        for host, port in hosts:
            left = deadline - time.monotonic()
            if left <= 0:
                reasons.append("%s:%d: not tried (time out)" % (host, port))
                break
            try:
                self.client = self._session(host, port, left, self.relay.tls != "none")
                self.peer = "%s:%d" % (host, port)
                return
            except _ProbeFailed as exc:
                reasons.append(str(exc))
        self.failure = "; ".join(reasons) or "no host to ask"
        log.warning("verify: [relay %s] cannot be asked: %s", self.relay.ident, self.failure)

    def _session(self, host: str, port: int, timeout: float, try_tls: bool) -> smtplib.SMTP:
        where = "%s:%d" % (host, port)
        client = smtplib.SMTP(timeout=timeout)
        client._host = host  # starttls() checks the certificate against it; only SMTP(host) would set it
        try:
            code, msg = client.connect(host, port)
            if code != 220:
                raise _ProbeFailed("%s: greeting %d %s" % (where, code, _text(msg)))
            self._hello(client, where)
            if try_tls and not self._tls(client, host, where):
                client.close()
                # Opportunistic TLS that failed leaves the stream in an unknown state: start over in plaintext.
                return self._session(host, port, timeout, try_tls=False)
            code, msg = client.mail("")
            if code != 250:
                raise _ProbeFailed("%s: MAIL FROM:<> got %d %s" % (where, code, _text(msg)))
            return client
        except (OSError, smtplib.SMTPException, ssl.SSLError, UnicodeError) as exc:
            client.close()
            raise _ProbeFailed("%s: %s" % (where, _why(exc))) from None
        except _ProbeFailed:
            client.close()
            raise

    def _hello(self, client: smtplib.SMTP, where: str) -> None:
        code, msg = client.ehlo(self.helo)
        if code == 250:
            return
        code, msg = client.helo(self.helo)
        if code != 250:
            raise _ProbeFailed("%s: HELO got %d %s" % (where, code, _text(msg)))

    def _tls(self, client: smtplib.SMTP, host: str, where: str) -> bool:
        """True when the session may go on (TLS up, or not wanted); False: redo without TLS."""
        required = self.relay.tls == "required"
        if not client.has_extn("starttls"):
            if required:
                raise _ProbeFailed("%s: STARTTLS not offered and [relay %s] has tls = required"
                                   % (where, self.relay.ident))
            return True
        if required:
            context = ssl.create_default_context(cafile=self.relay.tls_ca_file)
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            code, msg = client.starttls(context=context)
        except (OSError, smtplib.SMTPException, ssl.SSLError, ValueError) as exc:
            if required:
                raise _ProbeFailed("%s: TLS failed: %s" % (where, _why(exc))) from None
            log.info("verify: %s: opportunistic TLS failed (%s); asking without TLS", where, _why(exc))
            return False
        if code != 220:
            if required:
                raise _ProbeFailed("%s: STARTTLS got %d %s" % (where, code, _text(msg)))
            return True  # the server refused TLS and the session stays in plaintext
        self._hello(client, where)
        return True

    def _fail(self, why: str) -> None:
        self.failure = why
        log.warning("verify: [relay %s] %s", self.relay.ident, why)
        client, self.client = self.client, None
        if client is not None:
            client.close()


class VerifyCheck(Check):
    name = "verify"
    stages = frozenset(("rcpt",))

    def __init__(self, relays: Dict[str, RelayConfig], resolve: Callable[[str], list], cache: VerifyCache,
                 helo: str, timeout: float = 30.0):
        self.relays = {k: r for k, r in relays.items() if r.verify_recipients}
        self.resolve = resolve
        self.cache = cache
        self.helo = helo
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._probes: Dict[int, Dict[str, Probe]] = {}  # id(outcome) -> relay ident -> probe

    def check(self, stage: str, view, outcome) -> Optional[Reply]:
        address = view.recipient
        if not self.relays or not address:
            return None
        try:
            targets = self.resolve(address)
        except Exception:  # the session resolved it a moment ago; a reload in between is not the client's fault
            log.debug("verify: %s no longer resolves", address, exc_info=True)
            return None
        for target in targets:
            relay = self.relays.get(getattr(target, "name", None) or "")
            if relay is None or target.mailer != "relay":
                continue
            refused = self._verify(relay, target.address, address, outcome)
            if refused is not None:
                return refused
        return None

    def _verify(self, relay: RelayConfig, final: str, given: str, outcome) -> Optional[Reply]:
        verdict = self.cache.get(relay.ident, final)
        if verdict is None:
            verdict = self._probe(relay, outcome).rcpt(final)
            self.cache.put(relay.ident, final, verdict)
            log.info("verify: [relay %s] <%s>: %s", relay.ident, final,
                     "%d %s" % (verdict.code, verdict.text) if verdict.code else "no answer: " + verdict.text)
        if verdict.accepted:
            return None
        said = header_safe("%d %s" % (verdict.code, verdict.text) if verdict.code else verdict.text, 300)
        if verdict.refused:
            return Reply(550, "5.1.1", "<%s>: Recipient address rejected: undeliverable address: [relay %s] said: %s"
                         % (given, relay.ident, said))
        return Reply(450, "4.1.1", "<%s>: Recipient address rejected: unverified address: [relay %s]: %s"
                     % (given, relay.ident, said))

    def _probe(self, relay: RelayConfig, outcome) -> Probe:
        key = id(outcome)
        with self._lock:
            probes = self._probes.get(key)
            if probes is None:
                probes = self._probes[key] = {}
                outcome.on_close(lambda: self._close(key))
            probe = probes.get(relay.ident)
            if probe is None:
                probe = probes[relay.ident] = Probe(relay, self.helo, self.timeout)
        return probe

    def _close(self, key: int) -> None:
        with self._lock:
            probes = self._probes.pop(key, {})
        for probe in probes.values():
            probe.close()

    def open_probes(self) -> int:
        with self._lock:
            return sum(1 for p in self._probes.values() for q in p.values() if q.client is not None)


def _text(msg) -> str:
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    return header_safe(" ".join(str(msg).split()), 300)


def _why(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    return header_safe(str(exc) or type(exc).__name__, 200)


def checks(smtpd, config, resources: Resources) -> List[Check]:
    if not any(r.verify_recipients for r in config.relays.values()):
        return []
    router = Router(config)

    def resolve(address: str) -> list:
        return router.resolve(address, smtpd.routing_table, local_rcpt_to=smtpd.local_rcpt_to)

    cache = resources.get("verify-cache", VerifyCache)
    timeout = max(1.0, min(30.0, smtpd.timeout / 2.0))
    return [VerifyCheck(config.relays, resolve, cache, config.core.hostname, timeout)]
