"""DNS blocklists at RCPT: the client's address, reversed, looked up under each ``[smtpd] dnsbl`` zone.

API:
  ``reversed_name(ip, zone) -> str``: ``4.3.2.1.ZONE`` for 1.2.3.4; 32 nibbles for IPv6 (an IPv4-mapped IPv6
     address counts as IPv4).
  ``DnsblCache(size=10000, now=time.monotonic)``: answers by (zone, ip) until their TTL runs out; at most
     ``size`` entries, the least recently used go first.
  ``Listing``: ``listed`` (bool), ``text`` (the zone's TXT text, "" without one), ``ttl``.
  ``query(ip, zone, dns_server, lifetime) -> Listing``: one look-up, no cache; raises ``LookupFailed``.
  ``DnsblCheck(zones, is_trusted, cache, dns_server=None, lifetime=10.0, metrics=lambda: None)``: a chain
     ``Check`` for the ``rcpt`` stage; the first zone that lists the client refuses with
     ``554 5.7.1 Service unavailable; client [IP] blocked using ZONE`` and ``; TEXT`` when the zone has a TXT.
  ``checks(smtpd, config, resources) -> [DnsblCheck]``: the chain factory (``FACTORIES["dnsbl"]``); the cache
     is one per daemon (kept in ``resources``, so it survives reloads). The look-ups of one client take at most
     10 s in all (at most half the listener's ``timeout``), shared by the zones, at least 1 s each.
Invariants: listed means an A record in 127.0.0.0/8 outside 127.255.255.0/24 (RFC 5782 2.1; the 127.255.255/24
  answers are the lists' error codes, such as Spamhaus's "query refused"); any other answer is not listed and is
  logged. Clients in ``[core] trusted-networks`` are never looked up. A failed look-up (timeout, SERVFAIL) counts
  as not listed, is logged, and is not cached, so the next client tries again.
  NXDOMAIN is cached for the SOA's negative TTL when the answer carries one (RFC 2308), else ``NEGATIVE_TTL``.
Threading: a ``DnsblCheck`` and its cache are shared by every session; the cache has its own lock; look-ups
  run outside it (two sessions may look up the same address at once; both store the same answer).
Errors: none escape ``check``.
"""

import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from pmaster.policy.authres import header_safe
from pmaster.policy.chain import Check, Resources
from pmaster.policy.spf import make_resolver
from pmaster.policy.ttlcache import TtlCache
from pmaster.reply import Reply

log = logging.getLogger("pmaster.policy.dnsbl")

NEGATIVE_TTL = 300
MAX_TTL = 86400  # a zone's answer is never kept longer than a day, whatever its TTL says
CACHE_SIZE = 10000
LISTED_NET = ipaddress.ip_network("127.0.0.0/8")
ERROR_NET = ipaddress.ip_network("127.255.255.0/24")


class LookupFailed(Exception):
    """The zone could not be asked (timeout, SERVFAIL, no server): the client counts as not listed."""


@dataclass(frozen=True)
class Listing:
    listed: bool
    text: str = ""
    ttl: int = NEGATIVE_TTL


def reversed_name(ip: str, zone: str) -> str:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        labels = reversed(str(addr).split("."))
    else:
        labels = reversed(addr.exploded.replace(":", ""))
    return "%s.%s" % (".".join(labels), zone.rstrip("."))


class DnsblCache(TtlCache):
    def __init__(self, size: int = CACHE_SIZE, now: Callable[[], float] = time.monotonic):
        super().__init__(size, now)

    def get(self, zone: str, ip: str) -> Optional[Listing]:  # type: ignore[override]
        return TtlCache.get(self, (zone, ip))

    def put(self, zone: str, ip: str, listing: Listing) -> None:
        self.store((zone, ip), listing, max(0, min(listing.ttl, MAX_TTL)))


def query(ip: str, zone: str, dns_server: Optional[Tuple[str, int]], lifetime: float) -> Listing:
    name = reversed_name(ip, zone)
    try:
        answer = _resolve(name, "A", dns_server, lifetime)
    except _Negative as neg:
        return Listing(False, "", neg.ttl)
    addresses = [ipaddress.ip_address(rr.address) for rr in answer]
    listed = [a for a in addresses if a in LISTED_NET and a not in ERROR_NET]
    if not listed:
        log.warning("dnsbl: %s answered %s for [%s]: not a listing (an error code or a misconfigured zone)",
                    zone, ",".join(map(str, addresses)), ip)
        return Listing(False, "", int(answer.rrset.ttl))
    return Listing(True, _txt(name, dns_server, lifetime), int(answer.rrset.ttl))


class _Negative(Exception):
    """NXDOMAIN or no data, with the negative TTL to cache it for."""

    def __init__(self, ttl: int):
        super().__init__(ttl)
        self.ttl = ttl


def _resolve(name: str, rdtype: str, dns_server, lifetime: float):
    """The answer; raises _Negative (NXDOMAIN, no data) or LookupFailed."""
    res = make_resolver(dns_server)
    res.lifetime = lifetime
    res.timeout = min(lifetime, 3.0)
    try:
        return res.resolve(dns.name.from_text(name), rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
        raise _Negative(_negative_ttl(exc)) from None
    except dns.exception.Timeout:
        raise LookupFailed("timeout looking up %s %s" % (name, rdtype)) from None
    except dns.resolver.NoNameservers:
        raise LookupFailed("no server answered for %s %s (SERVFAIL)" % (name, rdtype)) from None
    except (dns.exception.DNSException, OSError, UnicodeError) as exc:
        raise LookupFailed("%s %s: %s" % (name, rdtype, exc)) from None


def _negative_ttl(exc: Exception) -> int:
    """RFC 2308 5: the smaller of the SOA's TTL and its minimum field, from the authority section."""
    try:
        if isinstance(exc, dns.resolver.NXDOMAIN):
            response = exc.response(exc.qnames()[0])
        else:
            response = exc.kwargs["response"]
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                return int(min(rrset.ttl, rrset[0].minimum))
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    return NEGATIVE_TTL


def _txt(name: str, dns_server, lifetime: float) -> str:
    try:
        answer = _resolve(name, "TXT", dns_server, lifetime)
    except LookupFailed as exc:
        log.info("dnsbl: no TXT text for %s: %s", name, exc)
        return ""
    except _Negative:
        return ""
    for rr in answer:
        text = b"".join(rr.strings).decode("utf-8", "replace").strip()
        if text:
            return header_safe(text, 200)
    return ""


class DnsblCheck(Check):
    name = "dnsbl"
    stages = frozenset(("rcpt",))

    def __init__(self, zones: Sequence[str], is_trusted: Callable[[str], bool], cache: DnsblCache,
                 dns_server: Optional[Tuple[str, int]] = None, lifetime: float = 10.0,
                 metrics: Callable[[], object] = lambda: None):
        self.zones = tuple(z.rstrip(".").lower() for z in zones)
        self.is_trusted = is_trusted
        self.cache = cache
        self.dns_server = dns_server
        self.lifetime = float(lifetime)
        self.metrics = metrics

    def check(self, stage: str, view, outcome) -> Optional[Reply]:
        ip = view.client_address
        if self.is_trusted(ip):
            return None
        for zone in self.zones:
            listing = self.listing(ip, zone)
            if listing is None or not listing.listed:
                continue
            metrics = self.metrics()
            if metrics is not None:
                metrics.dnsbl_hit(view.listener, zone)
            text = "Service unavailable; client [%s] blocked using %s" % (ip, zone)
            if listing.text:
                text += "; " + listing.text
            return Reply(554, "5.7.1", text)
        return None

    def listing(self, ip: str, zone: str) -> Optional[Listing]:
        """The zone's answer for ``ip`` (cached), None when the look-up failed."""
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            return None  # no address to look up (a unix-socket or test client)
        cached = self.cache.get(zone, ip)
        if cached is not None:
            return cached
        try:
            listing = query(ip, zone, self.dns_server, self.lifetime)
        except LookupFailed as exc:
            log.warning("dnsbl: look-up of [%s] in %s failed, not listed: %s", ip, zone, exc)
            return None
        self.cache.put(zone, ip, listing)
        return listing


def checks(smtpd, config, resources: Resources) -> List[Check]:
    if not smtpd.dnsbl:
        return []
    cache = resources.get("dnsbl-cache", DnsblCache)
    lifetime = max(1.0, min(10.0, smtpd.timeout / 2.0) / len(smtpd.dnsbl))
    return [DnsblCheck(smtpd.dnsbl, config.core.is_trusted, cache, config.core.dns_server, lifetime,
                       resources.metrics)]
