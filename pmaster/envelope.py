"""Addresses and the per-message envelope with per-recipient delivery state.

API:
  ``split_address(addr) -> (local, domain)``: domain lower-cased without a trailing dot ('' when absent).
  ``normalize_address(addr) -> str``: local part kept as given, domain lower-cased, trailing dot dropped.
  ``Recipient`` and ``Envelope``: dataclasses serialised as JSON (``to_json``/``from_json``), never pickle.
Invariants: ``Envelope.version`` names the record format; ``from_json`` refuses other versions and
  malformed records with ``ValueError`` so the spool can move them to ``corrupt/``.
  A recipient's ``mailer`` is ``"pipe"`` or ``"relay"`` and ``target`` names the mailer section, or is the
  literal inline ``relay(...)`` / ``pipe(...)`` text, so fixed sections apply after a reload (SPEC 5).
Threading: plain values; whoever shares one across threads locks it.
"""

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

ENVELOPE_VERSION = 1

PENDING = "pending"
SENT = "sent"
BOUNCED = "bounced"
RECIPIENT_STATES = (PENDING, SENT, BOUNCED)
# One line in field order (no sorting, no indent: json's C encoder, built once); `pmaster queue show`
# prints records readably.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def split_address(addr: str) -> Tuple[str, str]:
    """Split at the last '@' outside a quoted local part; the domain is normalised."""
    at = _last_unquoted_at(addr)
    if at < 0:
        return addr, ""
    domain = addr[at + 1:].lower()
    if domain.endswith("."):
        domain = domain[:-1]
    return addr[:at], domain


def normalize_address(addr: str) -> str:
    local, domain = split_address(addr)
    return "%s@%s" % (local, domain) if domain else local


def _last_unquoted_at(addr: str) -> int:
    if '"' not in addr:
        return addr.rfind("@")
    in_quote = False
    escaped = False
    last = -1
    for i, ch in enumerate(addr):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == "@" and not in_quote:
            last = i
    return last


@dataclass
class Recipient:
    address: str  # final recipient after routing: what the mailer delivers to
    original: str  # as given in RCPT TO (DSN Original-Recipient)
    mailer: str  # "pipe" or "relay"
    target: str  # mailer section name, or literal "relay(...)" / "pipe(...)"
    extension: str = ""  # cut off by recipient-delimiter, for ${EXTENSION}
    state: str = PENDING
    attempts: int = 0
    first_attempt: Optional[float] = None
    last_attempt: Optional[float] = None
    next_attempt: float = 0.0
    last_reply: str = ""
    dsn_status: str = ""  # enhanced status of the last reply, e.g. "5.1.1", for bounces

    @property
    def pending(self) -> bool:
        return self.state == PENDING


@dataclass
class Envelope:
    queue_id: str
    sender: str  # '' for the null sender
    recipients: List[Recipient]
    arrival: float
    size: int = 0  # octets of body in the record (SpoolWriter.commit sets it)
    helo: str = ""
    client_address: str = ""
    client_name: str = ""
    listener: str = ""
    tls: Optional[str] = None
    body_type: str = "7BIT"  # or "8BITMIME"
    held: bool = False
    is_bounce: bool = False  # a report we generated: its failures go to postmaster once, never further
    to_postmaster: bool = False  # a failed bounce redirected to postmaster: never bounce again
    version: int = ENVELOPE_VERSION
    extra: Dict[str, Any] = field(default_factory=dict)

    def pending(self) -> List[Recipient]:
        return [r for r in self.recipients if r.pending]

    def done(self) -> bool:
        return not any(r.pending for r in self.recipients)

    def to_json(self) -> str:
        # Flat copies, not dataclasses.asdict: its recursive deep copy costs more than the rest of a save.
        data = dict(self.__dict__)
        data["recipients"] = [dict(r.__dict__) for r in self.recipients]
        data["extra"] = dict(self.extra)
        return _ENCODER.encode(data) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Envelope":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != ENVELOPE_VERSION:
            raise ValueError("unsupported envelope version")
        try:
            rcpts = [Recipient(**r) for r in data.pop("recipients")]
            env = cls(recipients=rcpts, **data)
        except (TypeError, KeyError) as exc:
            raise ValueError("malformed envelope: %s" % exc) from None
        if not env.queue_id or any(r.state not in RECIPIENT_STATES for r in rcpts):
            raise ValueError("malformed envelope")
        return env
