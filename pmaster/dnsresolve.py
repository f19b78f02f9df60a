"""DNS look-ups for the relay mailer: MX hosts of a domain and address records of a host.

API:
  ``Resolver(server=None, timeout=10)``: ``server`` is ``[core] dns-server`` as ``(ip, port)``; ``None``
     uses the system resolver (``/etc/resolv.conf`` for MX; the C library, so ``/etc/hosts`` too, for
     addresses, as Postfix does with ``smtp_host_lookup = dns, native``).
  ``Resolver.mx_hosts(domain) -> [(preference, host)]``: sorted by preference (hosts of equal preference in
     random order, RFC 5321 section 5.1); the domain itself at preference 0 when it has no MX records
     (the implicit MX).
  ``Resolver.addresses(host) -> [ip]``: A records first, then AAAA; an IP literal is returned as is.
Invariants: names are looked up as absolute names (no search list); answers are never cached here.
Threading: a ``Resolver`` may be shared by every delivery thread; it keeps no per-query state.
Errors: ``NullMX`` (RFC 7505: the domain accepts no mail), ``NoSuchDomain`` (NXDOMAIN or an invalid name),
  ``DnsTempError`` (timeout, SERVFAIL, no usable name server). All subclass ``DnsError(PmasterError)``.
"""

import ipaddress
import logging
import random
import socket
from typing import List, Optional, Tuple

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from pmaster.errors import PmasterError

log = logging.getLogger("pmaster.dnsresolve")


class DnsError(PmasterError):
    """A DNS look-up failed; ``str()`` says which name and why."""


class NoSuchDomain(DnsError):
    """The name does not exist (NXDOMAIN) or is not a valid domain name: a permanent failure."""


class NullMX(DnsError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail at all."""


class DnsTempError(DnsError):
    """Timeout, SERVFAIL or no reachable name server: try again later."""


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Resolver:
    """Look-ups against one configured name server, or the system resolver when ``server`` is None."""

    def __init__(self, server: Optional[Tuple[str, int]] = None, timeout: float = 10.0):
        self.server = server
        self.timeout = float(timeout)

    def mx_hosts(self, domain: str) -> List[Tuple[int, str]]:
        """MX targets of ``domain`` by preference; the implicit MX when the name exists without MX records."""
        domain = domain.rstrip(".").lower()
        answer = self._query(domain, "MX")
        if answer is None:
            return [(0, domain)]
        records = [(int(rr.preference), rr.exchange.to_text(omit_final_dot=True).lower()) for rr in answer]
        # RFC 7505 section 3: a null MX is the only MX record, preference 0, exchange ".".
        if len(records) == 1 and records[0][1] in ("", "."):
            raise NullMX("%s does not accept mail (null MX)" % domain)
        # A "." among real MX records is a misconfiguration; it cannot be connected to, so drop it.
        records = [r for r in records if r[1] not in ("", ".")]
        random.shuffle(records)
        records.sort(key=lambda r: r[0])  # stable: equal preferences stay shuffled
        return records

    def addresses(self, host: str) -> List[str]:
        """A then AAAA records of ``host`` (duplicates removed); an IP literal is returned as is."""
        host = host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if is_ip_literal(host):
            return [host]
        host = host.rstrip(".").lower()
        if self.server is None:
            return self._native_addresses(host)
        return self._dns_addresses(host)

    # -- internals ---------------------------------------------------------------------------------

    def _dns_addresses(self, host: str) -> List[str]:
        out: List[str] = []
        temp: Optional[DnsTempError] = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = self._query(host, rdtype)
            except DnsTempError as exc:
                temp = exc
                continue
            for rr in answer or ():
                if rr.address not in out:
                    out.append(rr.address)
        # One family timing out while the other answered still gives usable addresses.
        if temp is not None and not out:
            raise temp
        return out

    def _native_addresses(self, host: str) -> List[str]:
        try:
            infos = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise NoSuchDomain("%s: host not found" % host) from None
            raise DnsTempError("%s: %s" % (host, exc.strerror or exc)) from None
        except (OSError, UnicodeError) as exc:
            raise DnsTempError("%s: %s" % (host, exc)) from None
        v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
        v6 = [i[4][0] for i in infos if i[0] == socket.AF_INET6]
        out: List[str] = []
        for ip in v4 + v6:
            if ip not in out:
                out.append(ip)
        return out

    def _resolver(self) -> dns.resolver.Resolver:
        # A fresh dnspython resolver per look-up: cheap, and no state shared between threads.
        if self.server is None:
            try:
                res = dns.resolver.Resolver(configure=True)
            except dns.exception.DNSException as exc:
                raise DnsTempError("no system resolver configuration: %s" % exc) from None
        else:
            res = dns.resolver.Resolver(configure=False)
            res.nameservers = [self.server[0]]
            res.port = int(self.server[1])
        res.lifetime = self.timeout
        res.timeout = min(self.timeout, 3.0)  # per try; dnspython retries within the lifetime
        return res

    def _query(self, name: str, rdtype: str):
        """The answer for ``name``/``rdtype``, None when the name exists without such records."""
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError) as exc:
            raise NoSuchDomain("%s: invalid domain name (%s)" % (name, exc)) from None
        res = self._resolver()
        try:
            return res.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain("%s: domain not found (NXDOMAIN)" % name) from None
        except dns.resolver.NoAnswer:
            return None
        except dns.exception.Timeout:
            raise DnsTempError("%s: DNS timeout looking up %s" % (name, rdtype)) from None
        except dns.resolver.NoNameservers:
            raise DnsTempError("%s: no name server answered for %s (SERVFAIL)" % (name, rdtype)) from None
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsTempError("%s: DNS error looking up %s: %s" % (name, rdtype, exc)) from None
