"""Binds a recipient's stored target to a mailer at delivery time and runs it.

API: ``Mailers(local_addresses)``: callable ``(delivery, mailer, target) -> List[Result]`` for the scheduler.
Invariants: sections are looked up by name in the configuration of the delivery (the current one), so a fixed
  ``[relay]`` or ``[pipe]`` applies after a reload to mail already queued; a section that has gone defers
  (SPEC 5). Inline ``relay(...)`` and ``pipe(...)`` texts are parsed from the envelope as stored. An unknown
  mailer kind in a record defers too (never raises).
Threading: one instance serves every worker thread; the resolver cache is locked.
Testing aid: ``PMASTER_MX_PORT`` sets the port of MX hosts for ``relay()`` (MX records carry no port).
"""

import logging
import os
import threading
from typing import Callable, Dict, List, Optional, Set, Tuple

from pmaster.dnsresolve import Resolver
from pmaster.mailers import TEMPFAIL, Delivery, Result, parse_inline, pipe, relay

log = logging.getLogger("pmaster.mailers")


def _mx_port() -> Optional[int]:
    # A testing aid: MX records cannot carry a port, so end-to-end tests of relay() set this.
    value = os.environ.get("PMASTER_MX_PORT", "")
    return int(value) if value.isdigit() else None


class Mailers:
    def __init__(self, local_addresses: Callable[[], Set[Tuple[str, int]]]):
        self.local_addresses = local_addresses
        self._resolvers: Dict[Optional[Tuple[str, int]], Resolver] = {}
        self._lock = threading.Lock()

    def resolver(self, server: Optional[Tuple[str, int]]) -> Resolver:
        """One resolver per ``dns-server`` value, so a reload that changes it takes effect."""
        with self._lock:
            if server not in self._resolvers:
                self._resolvers[server] = Resolver(server)
            return self._resolvers[server]

    def __call__(self, delivery: Delivery, mailer: str, target: str) -> List[Result]:
        config = delivery.config
        inline = parse_inline(target)
        if mailer == "pipe":
            if inline is not None and inline[0] == "pipe":
                return pipe.deliver(delivery, None, inline[1][0])
            section = config.pipes.get(target)
            if section is None:
                return self._gone(delivery, "pipe", target)
            return pipe.deliver(delivery, section, None)
        if mailer != "relay":
            return self._gone(delivery, mailer, target)
        resolver = self.resolver(config.core.dns_server)
        if inline is not None and inline[0] == "relay":
            return relay.deliver(delivery, None, inline[1], resolver, self.local_addresses,
                                 helo=config.core.hostname, mx_port=_mx_port())
        section = config.relays.get(target)
        if section is None:
            return self._gone(delivery, "relay", target)
        return relay.deliver(delivery, section, None, resolver, self.local_addresses,
                             helo=section.helo_name or config.core.hostname)

    def _gone(self, delivery: Delivery, kind: str, target: str) -> List[Result]:
        reply = "mailer section [%s %s] is not configured (any more)" % (kind, target)
        log.warning("%s: %s", delivery.queue_id, reply)
        return [Result(TEMPFAIL, reply, "4.3.5")] * len(delivery.recipients)
