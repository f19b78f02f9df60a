"""SPF (RFC 7208) at MAIL FROM: pyspf evaluates, dnspython asks ``[core] dns-server``.

API:
  ``SpfCheck(mode, authserv_id, dns_server=None, lifetime=20.0, metrics=lambda: None)``: a chain ``Check`` for
     the ``mail`` stage. ``mode`` is ``[smtpd] spf``: ``tag`` prepends ``Received-SPF:`` (RFC 7208 9.1) and
     ``Authentication-Results:`` (RFC 8601; authserv-id ``[core] hostname``) through the transaction's
     ``Outcome``; ``reject`` also refuses ``fail`` (``550 5.7.23``) and ``temperror`` (``451 4.7.24``).
  ``SpfCheck.evaluate(ip, sender, helo) -> SpfResult``: the result and both header lines, without a session.
  ``DnsCache(size=10000, now=time.monotonic)``: answers of SPF look-ups kept for their TTL (at most an hour;
     NXDOMAIN and no data for ``NEGATIVE_TTL``), bounded; failures are never kept. Optional ``cache=`` of
     ``SpfCheck``; the daemon keeps one per ``dns-server`` in the chain's ``Resources`` (over reloads).
  ``lookup_timeout(smtpd) -> float``: the time one evaluation may take (20 s, RFC 7208 4.6.4, at most half the
     listener's command ``timeout`` so the client still hears our answer).
  ``checks(smtpd, config, resources) -> [SpfCheck]``: the chain factory (``FACTORIES["spf"]``); none when
     ``spf = off``.
Invariants: the identity is MAIL FROM; for the null sender it is ``postmaster@HELO`` (RFC 7208 2.4), and a
  HELO that is not a domain name gives ``none``. Loopback clients are checked like any other (SPEC 9).
  Every look-up of an evaluation goes to the configured server (the system resolver when there is none),
  bounded by ``lifetime`` in all; a timeout or SERVFAIL is ``temperror``.
Threading: pyspf's module-level ``DNSLookup`` is replaced once, at import, by a dispatcher that uses the
  resolver of the calling thread's evaluation and falls back to pyspf's own look-up for any other caller,
  so no thread sees another's server. A ``SpfCheck`` is shared by every session of a listener.
Errors: none escape ``check``: DNS trouble is ``temperror``; an unexpected pyspf failure is logged and
  counted as ``temperror`` (never an accept without a result, never a traceback to the client).
"""

import ipaddress
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import dns.exception
import dns.name
import dns.resolver
import spf as pyspf

from pmaster.policy.authres import fold, header_safe
from pmaster.policy.chain import Check, Resources
from pmaster.policy.ttlcache import TtlCache
from pmaster.reply import Reply

log = logging.getLogger("pmaster.policy.spf")

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
MAX_LIFETIME = 20.0  # RFC 7208 4.6.4: at least 20 seconds for the whole evaluation
NEGATIVE_TTL = 60  # NXDOMAIN / no data: short, a domain that publishes its record is seen soon
MAX_TTL = 3600
_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{1,63}\.?$")

_local = threading.local()
_pyspf_lookup = pyspf.DNSLookup


def _dispatch_lookup(name, qtype, strict=True, timeout=30):
    resolver = getattr(_local, "resolver", None)
    if resolver is None:
        return _pyspf_lookup(name, qtype, strict, timeout)
    cache = getattr(_local, "cache", None)
    if cache is None:
        return _lookup(resolver, name, qtype, timeout)
    key = (str(name).lower().rstrip("."), qtype)
    hit = cache.get(key)
    if hit is not None:
        return hit
    answer, ttl = _lookup_ttl(resolver, name, qtype, timeout)
    cache.put(key, answer, ttl)
    return answer


class DnsCache(TtlCache):
    """Answers of SPF look-ups by (name, type) for their TTL (negative ones ``NEGATIVE_TTL``), bounded, locked.

    pyspf caches only within one evaluation; a busy MX asks for the same few domains all day.
    """

    def __init__(self, size: int = 10000, now: Callable[[], float] = time.monotonic):
        super().__init__(size, now)

    def put(self, key: Tuple[str, str], answer: list, ttl: int) -> None:
        self.store(key, answer, max(0, min(int(ttl), MAX_TTL)))


pyspf.DNSLookup = _dispatch_lookup


def _lookup(resolver: dns.resolver.Resolver, name: str, qtype: str, timeout: float) -> List[tuple]:
    """pyspf's DNSLookup contract: ``[((name, qtype), value)]``; [] for NXDOMAIN or no data."""
    return _lookup_ttl(resolver, name, qtype, timeout)[0]


def _lookup_ttl(resolver: dns.resolver.Resolver, name: str, qtype: str, timeout: float) -> Tuple[List[tuple], int]:
    resolver.lifetime = max(0.1, float(timeout))
    resolver.timeout = min(resolver.lifetime, 3.0)
    try:
        answer = resolver.resolve(dns.name.from_text(name), qtype, search=False, raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return [], NEGATIVE_TTL
    except dns.exception.Timeout:
        raise pyspf.TempError("DNS timeout looking up %s %s" % (name, qtype)) from None
    except dns.resolver.NoNameservers:
        raise pyspf.TempError("DNS: no server answered for %s %s (SERVFAIL)" % (name, qtype)) from None
    except (dns.exception.DNSException, OSError, UnicodeError) as exc:
        raise pyspf.TempError("DNS error looking up %s %s: %s" % (name, qtype, exc)) from None
    out = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    if answer.rrset is None:
        return out, NEGATIVE_TTL
    return out, int(answer.rrset.ttl)


def make_resolver(server: Optional[Tuple[str, int]]) -> dns.resolver.Resolver:
    if server is None:
        return dns.resolver.Resolver(configure=True)
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = [server[0]]
    res.port = int(server[1])
    return res


def lookup_timeout(smtpd) -> float:
    return max(1.0, min(MAX_LIFETIME, smtpd.timeout / 2.0))


def checks(smtpd, config, resources: Resources) -> List[Check]:
    if smtpd.spf == "off":
        return []
    cache = resources.get(("spf-dns-cache", config.core.dns_server), DnsCache)
    return [SpfCheck(smtpd.spf, config.core.hostname, config.core.dns_server, lookup_timeout(smtpd),
                     resources.metrics, cache)]


@dataclass(frozen=True)
class SpfResult:
    result: str  # one of RESULTS
    explanation: str
    identity: str  # "mailfrom" or "helo"
    received_spf: str  # "Received-SPF: ..." folded, no final CRLF
    authentication_results: str  # "Authentication-Results: ..." folded, no final CRLF


class SpfCheck(Check):
    name = "spf"
    stages = frozenset(("mail",))

    def __init__(self, mode: str, authserv_id: str, dns_server: Optional[Tuple[str, int]] = None,
                 lifetime: float = MAX_LIFETIME, metrics: Callable[[], object] = lambda: None,
                 cache: Optional[DnsCache] = None):
        self.mode = mode
        self.cache = cache
        self.authserv_id = authserv_id
        self.dns_server = dns_server
        self.lifetime = float(lifetime)
        self.metrics = metrics

    def check(self, stage: str, view, outcome) -> Optional[Reply]:
        sender = view.mail_from or ""
        res = self.evaluate(view.client_address, sender, view.helo or "")
        metrics = self.metrics()
        if metrics is not None:
            metrics.spf_result(view.listener, res.result)
        log.info("spf: client=[%s] identity=%s sender=<%s> helo=%s result=%s", view.client_address, res.identity,
                 sender, view.helo, res.result)
        if self.mode == "reject" and res.result == "fail":
            return Reply(550, "5.7.23", "<%s>: Sender address rejected: %s"
                         % (header_safe(sender), header_safe(res.explanation or "SPF fail - not authorized")))
        if self.mode == "reject" and res.result == "temperror":
            return Reply(451, "4.7.24", "<%s>: Sender address rejected: %s"
                         % (header_safe(sender), header_safe(res.explanation or "SPF Temporary Error")))
        outcome.prepend.append(res.received_spf)
        outcome.prepend.append(res.authentication_results)
        return None

    def evaluate(self, ip: str, sender: str, helo: str) -> SpfResult:
        helo_domain = helo if _DOMAIN.match(helo or "") else ""
        identity = "mailfrom" if sender else "helo"
        if not sender and not helo_domain:
            # RFC 7208 2.3: a HELO that is an address literal or garbage has no SPF record to check.
            return self._result("none", "", identity, ip, sender, helo, None)
        _local.resolver = make_resolver(self.dns_server)
        _local.cache = self.cache
        query = None
        try:
            query = pyspf.query(i=ip, s=sender, h=helo_domain or helo, receiver=self.authserv_id,
                                timeout=self.lifetime, querytime=self.lifetime)
            result, _code, explanation = query.check()
        except Exception:  # pyspf is third-party code: a bug there must not become an accept or a 421
            log.exception("spf: evaluation for client=[%s] sender=<%s> failed", ip, sender)
            result, explanation = "temperror", "internal error"
            query = None
        finally:
            _local.resolver = _local.cache = None
        if result not in RESULTS:
            result = "permerror"
        return self._result(result, explanation, identity, ip, sender, helo, query)

    def _result(self, result: str, explanation: str, identity: str, ip: str, sender: str, helo: str,
                query) -> SpfResult:
        received = self._received_spf(result, identity, ip, sender, helo, query)
        return SpfResult(result, explanation, identity, fold("Received-SPF", received),
                         fold("Authentication-Results", self._auth_results(result, identity, sender, helo)))

    def _received_spf(self, result: str, identity: str, ip: str, sender: str, helo: str, query) -> str:
        if query is not None:
            try:
                return header_safe(query.get_header(result, receiver=self.authserv_id), 2000)
            except Exception:  # a header pyspf cannot render: fall back to the minimal form below
                log.debug("spf: pyspf could not render Received-SPF", exc_info=True)
        # RFC 7208 9.1 minimal form: result, comment, key-value pairs.
        parts = ["%s (%s: %s)" % (result.capitalize() if result != "none" else "None", self.authserv_id,
                                  "no SPF check possible" if result == "none" else result),
                 "client-ip=%s;" % _ip_text(ip)]
        if sender:
            parts.append('envelope-from="%s";' % header_safe(sender).replace('"', ""))
        parts.append("helo=%s;" % _quote(helo))
        parts.append("receiver=%s;" % self.authserv_id)
        parts.append("identity=%s" % identity)
        return " ".join(parts)

    def _auth_results(self, result: str, identity: str, sender: str, helo: str) -> str:
        # RFC 8601 2.7.2: smtp.mailfrom is the MAIL FROM domain (the whole identity after "@"), smtp.helo the HELO.
        if identity == "mailfrom":
            prop = "smtp.mailfrom=%s" % _quote(sender.rsplit("@", 1)[-1])
        else:
            prop = "smtp.helo=%s" % _quote(helo or "unknown")
        return "%s; spf=%s %s" % (self.authserv_id, result, prop)


def _ip_text(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return header_safe(ip)


def _quote(value: str) -> str:
    """An RFC 2045 token as is, anything else as a quoted string (RFC 8601 2.2 pvalue)."""
    value = header_safe(value)
    if value and re.fullmatch(r"[A-Za-z0-9.@_+=-]+", value):
        return value
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')
