"""Mailers: hand a message to a program (pipe) or to another SMTP server (relay).

API: ``Delivery`` is one job (one message, recipients that share mailer, target and destination);
  a mailer's ``deliver(delivery) -> List[Result]`` returns one ``Result`` per recipient, in order.
  ``Result.status`` is ``OK``, ``TEMPFAIL`` or ``PERMFAIL`` (OpenSMTPD's outcome values).
  ``parse_inline(target)`` splits the literal ``relay(a, b)`` / ``pipe(cmd)`` that the envelope stores.
Invariants: mailers never raise for a delivery problem; they return TEMPFAIL with the reason.
"""

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from pmaster.config import Config
from pmaster.envelope import Envelope, Recipient

OK = "ok"
TEMPFAIL = "tempfail"
PERMFAIL = "permfail"


@dataclass(frozen=True)
class Result:
    status: str
    reply: str  # one line for the log and the DSN: "550 5.1.1 no such user", "exit 67: unknown user"
    dsn_status: str = ""  # RFC 3463 code: "5.1.1"; empty means derive from status
    tried: bool = True  # False: deferred without any attempt (a host skipped as refused): no backoff step

    @property
    def enhanced(self) -> str:
        if self.dsn_status:
            return self.dsn_status
        m = re.match(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b", self.reply)
        if m:
            return m.group(1)
        return {OK: "2.0.0", TEMPFAIL: "4.0.0", PERMFAIL: "5.0.0"}[self.status]


@dataclass
class Delivery:
    queue_id: str
    envelope: Envelope
    recipients: List[Recipient]
    body_path: str  # spool record: read the message (CRLF line ends, dot-unstuffed) with spool.open_body_file
    config: Config
    deadline: Optional[float] = None  # time.monotonic() after which the mailer must give up (shutdown)


_INLINE = re.compile(r"^(relay|pipe)\((.*)\)$", re.S)


def parse_inline(target: str) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """``relay(a, b:25)`` -> ("relay", ("a", "b:25")); ``relay()`` -> ("relay", ()); ``pipe(x)`` -> ("pipe", ("x",))."""
    m = _INLINE.match(target.strip())
    if not m:
        return None
    kind, inner = m.group(1), m.group(2)
    if kind == "pipe":
        return kind, (inner.strip(),)
    hosts = tuple(h.strip() for h in inner.split(",") if h.strip())
    return kind, hosts
