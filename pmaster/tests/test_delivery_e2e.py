"""End-to-end delivery through a real ``pmaster run`` daemon: SMTP in, the scheduler, real pipe programs and
real SMTP sinks out, a DNS server on loopback for every name (SPEC sections 3, 5 and 7)."""

import email
import os
import re
import smtplib
import socket

import pytest

from pmaster.tests.daemon_fixture import DaemonProcess, wait_for
from pmaster.tests.dnsserver import DnsServer
from pmaster.tests.smtpsink import SmtpSink

# {dns} is the loopback DnsServer: bounces to senders without a route go through relay() and must
# never leave 127.0.0.0/8.
CONFIG = """\
[core]
  hostname = mx.e2e.test
  spool-directory = {spool}
  pid-file = {tmp}/pmaster.pid
  retry-min = 1s
  retry-max = 2s
  queue-lifetime = {lifetime}
  dns-server = 127.0.0.1:{dns}

[smtpd e2e]
  name = mx.e2e.test
  listen-port = 127.0.0.1:{port}

{sections}

[route]
  @sender.test pipe(cat > {tmp}/bounce-$QUEUE_ID.eml)
  postmaster pipe(cat > {tmp}/postmaster-$QUEUE_ID.eml)
{routes}
"""

RECORD_SH = 'echo "$*" >> "$(dirname "$0")/argv.log"\ncat > /dev/null\n'


@pytest.fixture
def dns():
    records = {
        "far.test": {"MX": [(10, "mx1.far.test")]},
        "mx1.far.test": {"A": ["127.0.0.1"]},
        "sender.test": {"A": ["127.0.0.1"]},
    }
    with DnsServer(records, zones=("test",)) as server:
        yield server


@pytest.fixture
def daemon(tmp_path, dns):
    started = []

    def start(routes="", sections="", lifetime="1h", env=None) -> DaemonProcess:
        with open(os.path.join(str(tmp_path), "record.sh"), "w") as f:
            f.write(RECORD_SH)
        tmp = str(tmp_path)
        d = DaemonProcess(tmp_path, CONFIG, values={"dns": dns.address[1], "routes": routes.replace("{tmp}", tmp),
                                                    "sections": sections.replace("{tmp}", tmp),
                                                    "lifetime": lifetime},
                          env=dict(env or {}, PMASTER_DRAIN_SECONDS="2"))
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.stop()


def send(d: DaemonProcess, sender: str, rcpts, body: bytes = None, marker: str = "m1") -> None:
    body = body or ("From: <x@sender.test>\r\nSubject: e2e\r\nX-Marker: %s\r\n\r\nhello\r\n" % marker).encode()
    with d.smtp() as c:
        refused = c.sendmail(sender, rcpts, body)
    assert refused == {}


def files(d: DaemonProcess, prefix: str):
    return sorted(n for n in os.listdir(d.tmp) if n.startswith(prefix))


def read(d: DaemonProcess, name: str) -> str:
    with open(os.path.join(d.tmp, name), encoding="utf-8", errors="replace") as f:
        return f.read()


def delivery_lines(d: DaemonProcess):
    """(queue id, to, mailer, status, reply) of every delivery log line (SPEC 7 shape)."""
    shape = re.compile(r"(\w+): to=<([^>]*)> mailer=(.+?) status=(sent|deferred|bounced) delay=[\d.]+ \((.*)\)$")
    out = []
    for line in d.log_text().splitlines():
        m = shape.search(line)
        if m:
            out.append(m.groups())
    return out


def logged_deliveries(d: DaemonProcess, rcpt: str, count: int, timeout: float = 5):
    """Delivery lines logged for rcpt, once count of them are there: the log writer runs behind the spool."""
    def lines():
        return [entry for entry in delivery_lines(d) if entry[1] == rcpt]
    wait_for(lambda: len(lines()) >= count, timeout)
    return lines()


def delivery_report(text: str):
    msg = email.message_from_string(text)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    assert len(parts) == 1
    return msg, parts[0]


# -- pipe ---------------------------------------------------------------------------------------------


def test_inline_pipe_gets_the_message_and_logs_one_sent_line(daemon):
    d = daemon(routes="  @x.test pipe(cat > {tmp}/out.eml)")
    send(d, "a@sender.test", ["bob@x.test"])
    assert wait_for(lambda: os.path.exists(os.path.join(d.tmp, "out.eml")) and not d.queue_ids(), 10)
    assert "X-Marker: m1" in read(d, "out.eml")
    lines = logged_deliveries(d, "bob@x.test", 1)
    assert len(lines) == 1 and lines[0][3] == "sent" and lines[0][2].startswith("pipe(")


def test_pipe_section_batches_three_recipients_in_one_invocation(daemon):
    d = daemon(sections="[pipe rec]\n  exec = /bin/sh {tmp}/record.sh ${RCPT_TO}\n  max_rcpt_to = 16\n",
               routes="  @x.test rec")
    send(d, "a@sender.test", ["a@x.test", "b@x.test", "c@x.test"])
    assert wait_for(lambda: not d.queue_ids() and os.path.exists(os.path.join(d.tmp, "argv.log")), 10)
    assert read(d, "argv.log").splitlines() == ["a@x.test b@x.test c@x.test"]


EVIL_SENDER = "a`touch${IFS}pwned1`|touch${IFS}pwned3&&x@sender.test"


def test_sender_with_shell_metacharacters_never_executes_anything(daemon):
    d = daemon(sections="[pipe rec]\n  exec = /bin/sh {tmp}/record.sh ${MAIL_FROM}\n",
               routes="  @x.test pipe(echo \"$MAIL_FROM\" >> {tmp}/from.txt)\n  @y.test rec")
    # A quoted local part carries what an atom cannot: the server must accept it and keep it verbatim.
    sender = '"a;touch pwned4`touch pwned5`$(touch pwned6)"@sender.test'
    send(d, EVIL_SENDER, ["bob@x.test", "bob@y.test"])
    send(d, sender, ["bob@x.test"])
    assert wait_for(lambda: not d.queue_ids(), 10), d.log_text()
    # The two messages are delivered by parallel workers: in either order.
    assert sorted(read(d, "from.txt").splitlines()) == sorted([EVIL_SENDER, sender])
    assert read(d, "argv.log").splitlines() == [EVIL_SENDER]
    assert [n for n in os.listdir(d.tmp) if n.startswith("pwned")] == []
    assert [n for n in os.listdir(os.getcwd()) if n.startswith("pwned")] == []


# -- relay ----------------------------------------------------------------------------------------------


def test_falls_back_to_the_second_relay_address_when_the_first_refuses(daemon):
    with SmtpSink(greeting="421 4.3.2 busy, go away") as busy, SmtpSink() as good:
        d = daemon(sections="[relay up]\n  address = 127.0.0.1:%d\n  address = 127.0.0.1:%d\n"
                            % (busy.port, good.port), routes="  @x.test up")
        send(d, "a@sender.test", ["bob@x.test"])
        assert len(good.wait_for_messages(1, 10)) == 1
        assert busy.connections >= 1 and busy.messages == []
        assert good.messages[0].rcpts == ["bob@x.test"]


def test_451_then_success_is_delivered_exactly_once(daemon):
    with SmtpSink(tempfail_first=1) as sink:
        d = daemon(routes="  @x.test relay(127.0.0.1:%d)" % sink.port)
        send(d, "a@sender.test", ["bob@x.test"])
        assert len(sink.wait_for_messages(1, 10)) == 1
        assert wait_for(lambda: not d.queue_ids(), 5)
        assert len(sink.messages) == 1 and len(sink.transactions) == 2
        statuses = [entry[3] for entry in logged_deliveries(d, "bob@x.test", 2)]
        assert statuses == ["deferred", "sent"]
        assert wait_for(lambda: d.spool_files("queue") == [], 5)  # the envelope saved at the deferral too


def test_550_gives_one_delivery_report_with_the_remote_text(daemon):
    with SmtpSink(rcpt_replies={"bob@x.test": "550 5.1.1 <bob@x.test>: no such mailbox here"}) as sink:
        d = daemon(routes="  @x.test relay(127.0.0.1:%d)" % sink.port)
        send(d, "alice@sender.test", ["bob@x.test", "carol@x.test"])
        assert wait_for(lambda: files(d, "bounce-") and not d.queue_ids(), 10), d.log_text()
        assert len(sink.messages) == 1 and sink.messages[0].rcpts == ["carol@x.test"]
        assert len(files(d, "bounce-")) == 1
        msg, status = delivery_report(read(d, files(d, "bounce-")[0]))
        assert msg["Auto-Submitted"] == "auto-replied"
        assert msg["To"] == "<alice@sender.test>"
        blocks = status.get_payload()
        fields = {k: v for block in blocks for k, v in block.items()}
        assert fields["Final-Recipient"] == "rfc822; bob@x.test"
        assert fields["Status"] == "5.1.1" and fields["Action"] == "failed"
        assert "550 5.1.1" in fields["Diagnostic-Code"] and "no such mailbox here" in fields["Diagnostic-Code"]
        assert "carol@x.test" not in status.as_string()


def test_bounce_to_a_sender_without_a_route_goes_through_mx(daemon):
    with SmtpSink(rcpt_replies={"bob@far.test": "550 5.1.1 unknown user bob"}) as sink:
        d = daemon(routes="  @far.test relay()", env={"PMASTER_MX_PORT": str(sink.port)})
        send(d, "alice@far.test", ["bob@far.test"])
        msgs = sink.wait_for_messages(1, 10)
        assert len(msgs) == 1
        assert msgs[0].mail_from == "" and msgs[0].rcpts == ["alice@far.test"]
        delivery_report(msgs[0].data.decode("utf-8", "replace"))


def test_expired_message_bounces_with_status_4_4_7(daemon):
    with SmtpSink(mail_reply="451 4.3.0 always later") as sink:
        d = daemon(lifetime="3s", routes="  @x.test relay(127.0.0.1:%d)" % sink.port)
        send(d, "alice@sender.test", ["bob@x.test"])
        assert wait_for(lambda: files(d, "bounce-") and not d.queue_ids(), 12), d.log_text()
        _, status = delivery_report(read(d, files(d, "bounce-")[0]))
        assert "Status: 4.4.7" in status.as_string()
        assert "always later" in status.as_string()
        assert sink.messages == []


def test_failed_bounce_goes_once_to_postmaster_and_never_further(daemon):
    with SmtpSink(mail_reply="550 5.7.1 go away") as sink:
        d = daemon(routes="  @x.test relay(127.0.0.1:%d)\n  @bad.test pipe(exit 67)" % sink.port)
        send(d, "alice@bad.test", ["bob@x.test"])
        assert wait_for(lambda: files(d, "postmaster-") and not d.queue_ids(), 10), d.log_text()
        assert len(files(d, "postmaster-")) == 1
        assert "Undelivered Mail Returned to Sender" in read(d, files(d, "postmaster-")[0])


def test_null_sender_failure_never_bounces(daemon):
    with SmtpSink(mail_reply="550 5.7.1 go away") as sink:
        d = daemon(routes="  @x.test relay(127.0.0.1:%d)" % sink.port)
        send(d, "", ["bob@x.test"])
        assert wait_for(lambda: "null sender: no bounce sent" in d.log_text(), 10)
        assert wait_for(lambda: not d.queue_ids(), 5)
        assert files(d, "bounce-") == [] and files(d, "postmaster-") == []


# -- reloads and restarts ----------------------------------------------------------------------------------


def test_relay_section_fixed_by_sighup_applies_to_queued_mail(daemon):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: refuses connections
    try:
        with SmtpSink() as sink:
            d = daemon(sections="[relay up]\n  address = 127.0.0.1:%d\n" % dead.getsockname()[1],
                       routes="  @x.test up")
            send(d, "a@sender.test", ["bob@x.test"])
            assert wait_for(lambda: any(e[3] == "deferred" for e in delivery_lines(d)), 10)
            with open(d.config_path) as f:
                text = f.read()
            with open(d.config_path, "w") as f:
                f.write(text.replace("127.0.0.1:%d" % dead.getsockname()[1], "127.0.0.1:%d" % sink.port))
            d.reload()
            assert len(sink.wait_for_messages(1, 10)) == 1
            assert wait_for(lambda: not d.queue_ids(), 5)
    finally:
        dead.close()


def test_relay_section_that_has_gone_defers_and_logs(daemon):
    with SmtpSink(mail_reply="451 4.3.0 not now") as sink:
        d = daemon(sections="[relay up]\n  address = 127.0.0.1:%d\n" % sink.port, routes="  @x.test up")
        send(d, "a@sender.test", ["bob@x.test"])
        assert wait_for(lambda: any(e[3] == "deferred" for e in delivery_lines(d)), 10)
        with open(d.config_path) as f:
            text = f.read()
        with open(d.config_path, "w") as f:
            f.write(text.replace("[relay up]", "[pipe other]").replace("  address = 127.0.0.1:%d" % sink.port,
                                                                     "  exec = /bin/true")
                    .replace("@x.test up", "@x.test other"))
        d.reload()
        assert wait_for(lambda: "[relay up] is not configured" in d.log_text(), 10), d.log_text()
        qid = d.queue_ids()[0]

        def last_reply():
            return d.envelope(qid)["recipients"][0]["last_reply"]

        assert wait_for(lambda: "[relay up] is not configured" in last_reply(), 5)
        assert d.envelope(qid)["recipients"][0]["state"] == "pending"


def test_recipient_recorded_as_sent_is_not_delivered_again_after_restart(daemon):
    with SmtpSink(mail_reply="451 4.3.0 not now") as sink:
        d = daemon(routes="  @p.test pipe(echo once >> {tmp}/p.txt)\n  @x.test relay(127.0.0.1:%d)" % sink.port)
        send(d, "a@sender.test", ["a@p.test", "b@x.test"])

        def recorded():
            ids = d.queue_ids()
            if not ids:
                return False
            states = [r["state"] for r in d.envelope(ids[0])["recipients"]]
            return states == ["sent", "pending"]

        assert wait_for(recorded, 10)
        d.kill9()
        sink.mail_reply = None
        d.start()
        assert len(sink.wait_for_messages(1, 10)) == 1
        assert wait_for(lambda: not d.queue_ids(), 5)
        assert read(d, "p.txt").splitlines() == ["once"]


def test_unroutable_recipient_is_refused_at_rcpt(daemon):
    d = daemon(routes="  @x.test pipe(cat > /dev/null)")
    with d.smtp() as c:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("a@sender.test", ["bob@nowhere.invalid"], b"Subject: x\r\n\r\nx\r\n")
