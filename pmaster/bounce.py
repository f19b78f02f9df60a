"""Delivery status notifications (RFC 3464 ``multipart/report``) for mail that could not be delivered.

API:
  ``should_bounce(envelope) -> bool``: False for the null sender (RFC 5321 section 6.1: never bounce a bounce) and
     for a failed bounce already redirected to postmaster; the caller then logs and drops.
  ``build_bounce(envelope, failed, hostname, body_path, now, delayed=False) -> bytes``: the whole report,
     CRLF line ends, ready to be spooled as a new message from ``<>`` to ``envelope.sender``.
Invariants: the report has three parts: a human explanation quoting each recipient's last reply, a
  ``message/delivery-status`` part (RFC 3464 section 2) and the original header block as ``text/rfc822-headers``
  (at most 64 KiB, never the body). It carries ``Auto-Submitted: auto-replied`` (RFC 3834). Every value taken from
  mail or from a remote server is stripped of CR, LF and other control characters before it enters a header
  or a DSN field, so nothing can inject a header; non-ASCII in DSN fields becomes ``?`` (the fields are ASCII).
Threading: pure apart from reading ``body_path``; safe from any thread.
Errors: an unreadable original leaves the third part out rather than failing the bounce.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import re
import secrets

from pmaster.envelope import Envelope, Recipient
from pmaster.spool import open_body_file

log = logging.getLogger("pmaster.bounce")

HEADERS_LIMIT = 64 * 1024  # bytes of the original header block returned
FIELD_LIMIT = 900  # characters of one DSN field value: keeps every line under RFC 5322's 998

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_REPLY_STATUS = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")
_SMTP_REPLY = re.compile(r"^\d{3}(?:[ -]|$)")


def should_bounce(envelope: Envelope) -> bool:
    """Bounce only to a real sender: never to ``<>``, never a second time for a failed bounce."""
    return bool(envelope.sender) and not envelope.to_postmaster


def _clean(text: str, limit: int = FIELD_LIMIT) -> str:
    """One line, no control characters: safe inside any header or DSN field."""
    return _CONTROL.sub(" ", text).strip()[:limit]


def _ascii(text: str, limit: int = FIELD_LIMIT) -> str:
    return _clean(text, limit).encode("ascii", "replace").decode("ascii")


def _date(when: float) -> str:
    """RFC 5322 date in UTC with an explicit "+0000" ("-0000" would mean the zone is unknown)."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(when, datetime.timezone.utc))


def dsn_status(rcpt: Recipient, delayed: bool = False) -> str:
    """The recipient's RFC 3463 status: stored, else read from its last reply, else the generic one."""
    if _STATUS.match(rcpt.dsn_status or ""):
        return rcpt.dsn_status
    m = _REPLY_STATUS.match(rcpt.last_reply or "")
    if m:
        return m.group(1)
    return "4.0.0" if delayed else "5.0.0"


def _diagnostic(reply: str) -> str:
    """``smtp;`` for a remote SMTP reply, ``x-unix;`` for a local program's exit (RFC 3464 section 2.3.6)."""
    text = _ascii(reply)
    kind = "smtp" if _SMTP_REPLY.match(text) else "x-unix"
    return f"{kind}; {text}"


def _original_headers(body_path: str) -> bytes | None:
    """The header block of the queued message (up to the first empty line), at most HEADERS_LIMIT bytes."""
    try:
        with open_body_file(body_path) as f:
            data = f.read(HEADERS_LIMIT)
    except OSError as exc:
        log.warning("cannot read %s for a bounce: %s", body_path, exc.strerror or exc)
        return None
    end = _header_end(data)
    if end is None:
        # No empty line within the limit: keep whole lines only.
        cut = data.rfind(b"\n")
        end = cut + 1 if cut >= 0 else len(data)
    block = data[:end]
    lines = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"".join(line + b"\r\n" for line in lines if line)


def _header_end(data: bytes) -> int | None:
    """Offset just past the last header line, or None when the block does not end within ``data``."""
    if data.startswith((b"\r\n", b"\n")):
        return 0
    positions = [p for p in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if p >= 0]
    if not positions:
        return None
    first = min(positions)
    return first + (2 if data[first:first + 4] == b"\r\n\r\n" else 1)


def _boundary(*parts: bytes) -> str:
    """A boundary that occurs in none of the parts (RFC 2046 section 5.1.1)."""
    for _ in range(16):
        candidate = "=_pmaster_" + secrets.token_hex(12)
        marker = candidate.encode("ascii")
        if not any(marker in part for part in parts):
            return candidate
    raise RuntimeError("cannot find a MIME boundary")  # 16 misses of 96 random bits: not in this universe


def _human_text(envelope: Envelope, failed: list[Recipient], hostname: str, delayed: bool) -> str:
    if delayed:
        lead = ("This is the mail system at host {host}.\n\n"
                "Your message could not be delivered yet to one or more recipients.\n"
                "It is still in the queue and delivery will be retried; you do not need to resend it.\n")
    else:
        lead = ("This is the mail system at host {host}.\n\n"
                "I'm sorry to have to inform you that your message could not\n"
                "be delivered to one or more recipients. Its headers are attached below.\n\n"
                "For further assistance, please send mail to postmaster.\n\n"
                "If you do so, please include this problem report.\n")
    lines = [lead.format(host=_clean(hostname)), "                   The mail system", ""]
    for rcpt in failed:
        reply = _clean(rcpt.last_reply) or ("delivery delayed" if delayed else "delivery failed")
        lines.append(f"<{_clean(rcpt.address)}>: {reply}")
    return "\n".join(lines) + "\n"


def _status_fields(envelope: Envelope, failed: list[Recipient], hostname: str, now: float,
                   delayed: bool) -> str:
    """The ``message/delivery-status`` body: per-message fields, then one block per recipient."""
    blocks = [[
        f"Reporting-MTA: dns; {_ascii(hostname)}",
        f"X-Postmaster-Queue-ID: {_ascii(envelope.queue_id)}",
        f"X-Postmaster-Sender: rfc822; {_ascii(envelope.sender)}",
        f"Arrival-Date: {_date(envelope.arrival)}",
    ]]
    if envelope.helo:
        blocks[0].insert(1, f"Received-From-MTA: dns; {_ascii(envelope.helo)}")
    for rcpt in failed:
        block = [
            f"Final-Recipient: rfc822; {_ascii(rcpt.address)}",
            f"Original-Recipient: rfc822; {_ascii(rcpt.original or rcpt.address)}",
            f"Action: {'delayed' if delayed else 'failed'}",
            f"Status: {dsn_status(rcpt, delayed)}",
        ]
        if rcpt.last_reply:
            block.append(f"Diagnostic-Code: {_diagnostic(rcpt.last_reply)}")
        block.append(f"Last-Attempt-Date: {_date(rcpt.last_attempt or now)}")
        blocks.append(block)
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def _transfer_encoding(data: bytes) -> str:
    return "7bit" if data.isascii() else "8bit"


def build_bounce(envelope: Envelope, failed: list[Recipient], hostname: str, body_path: str, now: float,
                 delayed: bool = False) -> bytes:
    """The complete RFC 3464 report for ``failed`` recipients of ``envelope``, with CRLF line ends.

    ``delayed=True`` builds a delay warning (``Action: delayed``) instead of a failure report.
    """
    host = _ascii(hostname, 255) or "localhost"
    human = _crlf(_human_text(envelope, failed, host, delayed))
    status = _crlf(_status_fields(envelope, failed, host, now, delayed))
    original = _original_headers(body_path)
    boundary = _boundary(human, status, original or b"")
    subject = "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{_ascii(envelope.sender)}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: {email.utils.make_msgid('bounce', domain=host)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: " + ("7bit" if human.isascii() and (original or b"").isascii() else "8bit"),
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    out = [_crlf("\n".join(headers) + "\n")]
    out.append(_part(boundary, "text/plain; charset=utf-8", human))
    out.append(_part(boundary, "message/delivery-status", status))
    if original is not None:
        out.append(_part(boundary, "text/rfc822-headers", original))
    out.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def _part(boundary: str, content_type: str, payload: bytes) -> bytes:
    head = (f"--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Transfer-Encoding: {_transfer_encoding(payload)}\r\n\r\n")
    if payload and not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return head.encode("ascii") + payload + b"\r\n"
