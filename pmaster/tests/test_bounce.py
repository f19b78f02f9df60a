"""RFC 3464 bounces: structure, per-recipient fields, original headers, no header injection, never to <>."""

import email
import email.policy

from pmaster.bounce import HEADERS_LIMIT, build_bounce, dsn_status, should_bounce
from pmaster.envelope import Envelope, Recipient
from pmaster.spool import record_trailer

NOW = 1700000000.0
ORIGINAL = (b"Received: from client by mx\r\nSubject: quarterly report\r\nMessage-ID: <orig@example.org>\r\n"
            b"From: Alice <alice@example.org>\r\n\r\nSECRET BODY TEXT\r\n")


def rcpt(address, original=None, reply="", status=""):
    return Recipient(address=address, original=original or address, mailer="relay", target="relay()",
                     last_reply=reply, dsn_status=status, last_attempt=NOW - 60, attempts=1)


def envelope(sender="alice@example.org", recipients=()):
    return Envelope(queue_id="QID0001", sender=sender, recipients=list(recipients), arrival=NOW - 3600,
                    helo="client.example.org")


def build(tmp_path, failed, sender="alice@example.org", body=ORIGINAL, **kw):
    env = envelope(sender, failed)
    path = tmp_path / "body"
    path.write_bytes(body + record_trailer(len(body), env))  # a spool record, as the scheduler passes
    return build_bounce(env, failed, "mx.example.net", str(path), NOW, **kw)


def parse(data):
    return email.message_from_bytes(data)


def status_blocks(msg):
    [report] = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    return report.get_payload()


def test_bounce_is_multipart_report_with_three_parts(tmp_path):
    msg = parse(build(tmp_path, [rcpt("bob@example.com", reply="550 5.1.1 no such user")]))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    types = [p.get_content_type() for p in msg.get_payload()]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert not msg.defects


def test_bounce_headers(tmp_path):
    msg = parse(build(tmp_path, [rcpt("bob@example.com", reply="550 5.1.1 no such user")]))
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.net>"
    assert msg["To"] == "<alice@example.org>"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith("@mx.example.net>")
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW


def test_uses_crlf_line_ends_only(tmp_path):
    data = build(tmp_path, [rcpt("bob@example.com", reply="550 5.1.1 no such user")])
    assert data.count(b"\n") == data.count(b"\r\n")
    assert b"\r\r" not in data


def test_per_message_fields(tmp_path):
    fields = status_blocks(parse(build(tmp_path, [rcpt("bob@example.com", reply="550 5.1.1 x")])))[0]
    assert fields["Reporting-MTA"] == "dns; mx.example.net"
    assert fields["X-Postmaster-Queue-ID"] == "QID0001"
    assert email.utils.parsedate_to_datetime(fields["Arrival-Date"]).timestamp() == NOW - 3600


def test_per_recipient_fields_carry_the_remote_text(tmp_path):
    failed = [rcpt("bob@example.com", original="Bob@Example.COM", reply="550 5.1.1 <bob@example.com>: no such user"),
              rcpt("carol@example.com", reply="exit 67: unknown user carol", status="5.1.1"),
              rcpt("dave@example.com", reply="554 transaction failed")]
    blocks = status_blocks(parse(build(tmp_path, failed)))[1:]
    assert len(blocks) == 3
    bob, carol, dave = blocks
    assert bob["Final-Recipient"] == "rfc822; bob@example.com"
    assert bob["Original-Recipient"] == "rfc822; Bob@Example.COM"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.com>: no such user"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW - 60
    assert carol["Original-Recipient"] == "rfc822; carol@example.com"
    assert carol["Diagnostic-Code"] == "x-unix; exit 67: unknown user carol"
    assert dave["Status"] == "5.0.0"


def test_human_part_quotes_each_reply(tmp_path):
    msg = parse(build(tmp_path, [rcpt("bob@example.com", reply="550 5.1.1 no such user"),
                                 rcpt("eve@example.com", reply="552 5.2.2 mailbox full")]))
    text = msg.get_payload()[0].get_payload(decode=True).decode()
    assert "<bob@example.com>: 550 5.1.1 no such user" in text
    assert "<eve@example.com>: 552 5.2.2 mailbox full" in text
    assert "mx.example.net" in text


def test_original_headers_are_returned_without_the_body(tmp_path):
    data = build(tmp_path, [rcpt("bob@example.com", reply="550 5.1.1 x")])
    part = parse(data).get_payload()[2]
    headers = part.get_payload()
    assert "Subject: quarterly report" in headers
    assert "Message-ID: <orig@example.org>" in headers
    assert b"SECRET BODY TEXT" not in data


def test_original_headers_are_bounded(tmp_path):
    body = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"f" * 60) for i in range(3000)) + b"\r\nbody\r\n"
    data = build(tmp_path, [rcpt("bob@example.com", reply="550 5.1.1 x")], body=body)
    headers = parse(data).get_payload()[2].get_payload()
    assert len(headers) <= HEADERS_LIMIT
    assert headers.startswith("X-Filler-000000")
    assert all(line.startswith("X-Filler-") and len(line) == 77 for line in headers.splitlines())


def test_missing_original_still_bounces(tmp_path):
    failed = [rcpt("bob@example.com", reply="550 5.1.1 x")]
    data = build_bounce(envelope(recipients=failed), failed, "mx.example.net", str(tmp_path / "gone"), NOW)
    msg = parse(data)
    assert [p.get_content_type() for p in msg.get_payload()] == ["text/plain", "message/delivery-status"]


def test_crlf_in_reply_or_address_cannot_inject_headers(tmp_path):
    evil_reply = "550 5.1.1 no\r\nBcc: victim@example.org\r\n\r\nX-Injected: yes"
    failed = [rcpt("bob@example.com\r\nX-Injected: yes", reply=evil_reply)]
    data = build(tmp_path, failed, sender="alice@example.org\r\nBcc: victim@example.org")
    msg = parse(data)
    assert msg["Bcc"] is None and msg["X-Injected"] is None
    assert msg["To"].startswith("<alice@example.org")
    [block] = status_blocks(msg)[1:]
    assert block["X-Injected"] is None and block["Bcc"] is None
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.1.1 no Bcc: victim@example.org")
    assert "\n" not in block["Final-Recipient"]
    assert not any(line.startswith((b"X-Injected", b"Bcc")) for line in data.split(b"\r\n"))


def test_delayed_report_says_delayed(tmp_path):
    msg = parse(build(tmp_path, [rcpt("bob@example.com", reply="451 4.3.0 try later")], delayed=True))
    [block] = status_blocks(msg)[1:]
    assert (block["Action"], block["Status"]) == ("delayed", "4.3.0")
    assert msg["Subject"] == "Delayed Mail (still being retried)"


def test_parses_cleanly_with_modern_policy(tmp_path):
    data = build(tmp_path, [rcpt("bob@example.com", reply="550 5.1.1 non-ascii r\u00e9ponse")])
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert "r\u00e9ponse" in msg.get_body(("plain",)).get_content()
    assert "r?ponse" in status_blocks(msg)[1]["Diagnostic-Code"]


def test_never_bounce_to_null_sender():
    assert should_bounce(envelope(sender="")) is False
    assert should_bounce(envelope(sender="alice@example.org")) is True


def test_never_bounce_a_bounce_redirected_to_postmaster():
    env = envelope(sender="alice@example.org")
    env.to_postmaster = True
    assert should_bounce(env) is False


def test_dsn_status_prefers_stored_then_reply_then_generic():
    assert dsn_status(rcpt("a@x", reply="550 5.1.1 x", status="5.7.1")) == "5.7.1"
    assert dsn_status(rcpt("a@x", reply="550-5.2.2 full")) == "5.2.2"
    assert dsn_status(rcpt("a@x", reply="exit 1: oops")) == "5.0.0"
    assert dsn_status(rcpt("a@x", reply="timeout"), delayed=True) == "4.0.0"
