"""Postmaster policy callable: only clients from listed networks may talk to this listener.

    [smtpd submission]
      policy = allowlist:check

Put this file next to the configuration file (policy modules are imported from its directory first).
The networks come from ``allowlist.networks`` next to this file (one address or CIDR network per line,
``#`` starts a comment); without that file only loopback may connect. ``pmaster`` re-imports the module
on SIGHUP, so an edited list takes effect at the next reload.

Other clients get ``554 5.7.1`` as their greeting (and nothing but QUIT is answered after it).
"""

import ipaddress
import os

LIST_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allowlist.networks")
DEFAULT = ("127.0.0.0/8", "::1/128")


def _load(path):
    try:
        with open(path) as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
    except FileNotFoundError:
        lines = list(DEFAULT)
    return tuple(ipaddress.ip_network(n, strict=False) for n in lines if n)


NETWORKS = _load(LIST_FILE)  # read once per import: sessions only read it (thread-safe)


def allowed(address):
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in NETWORKS)


def check(stage, session):
    if stage != "connect" or allowed(session.client_address):
        return None
    return (554, "5.7.1", "Access denied: client [%s] is not allowed here" % session.client_address)
