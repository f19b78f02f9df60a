"""SPF, DNSBL and recipient verification end to end: a real daemon, a DNS server and SMTP relays on loopback."""

import os
import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pmaster.tests.daemon_fixture import DaemonProcess, RawClient, wait_until
from pmaster.tests.dnsserver import DnsServer
from pmaster.tests.smtpsink import SmtpSink

CONFIG = """\
[core]
  hostname = mx.test
  spool-directory = {spool}
  pid-file = {tmp}/run/pmaster.pid
  dns-server = 127.0.0.1:{dns}
  retry-min = 1s
  retry-max = 2s

[smtpd reject]
  name = mx.test
  listen-port = 127.0.0.1:{port}
  timeout = 6s
  spf = reject
  dnsbl = bl.test
  dnsbl = slowbl.test

[smtpd tag]
  name = mx.test
  listen-port = 127.0.0.1:{port1}
  spf = tag

[metrics]
  listen-port = 127.0.0.1:{port2}

[relay inside]
  address = 127.0.0.1:{inside}
  tls = none
  verify-recipients = yes

[relay hang]
  address = 127.0.0.1:{hang}
  tls = none
  verify-recipients = yes

[route]
  @example.org  pipe(cat >> {tmp}/mailbox)
  @inside.test  inside
  @hang.test  hang
"""

RECORDS = {
    "pass.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
    "fail.test": {"TXT": ["v=spf1 -all"]},
    "soft.test": {"TXT": ["v=spf1 ~all"]},
    "helofail.test": {"TXT": ["v=spf1 -all"]},
    "2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["Listed by bl.test, see https://bl.test/127.0.0.2"]},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("antispam")
    with DnsServer(RECORDS, zones=("test",), timeout_names=("slow.test", "4.0.0.127.slowbl.test")) as dns, \
            SmtpSink(rcpt_replies={"nobody@inside.test": "550 5.1.1 <nobody@inside.test>: no such user",
                                   "busy@inside.test": "452 4.2.2 mailbox full"}) as inside, \
            SmtpSink(greeting_delay=20) as hang:
        d = DaemonProcess(tmp, CONFIG, extra_ports=2,
                          values={"dns": dns.address[1], "inside": inside.address[1], "hang": hang.address[1]})
        d.start()
        try:
            yield d, dns, inside
        finally:
            d.stop()


def client(d, source="127.0.0.1", port=None):
    c = RawClient("127.0.0.1", port or d.port, source=source)
    assert c.cmd("EHLO client.test")[-1].startswith("250")
    return c


def send_message(c, body):
    assert c.cmd("DATA")[0].startswith("354")
    c.send(body.replace("\n", "\r\n").encode() + b".\r\n")
    reply = c.reply()[-1]
    assert reply.startswith("250"), reply
    return reply.rsplit(" ", 1)[-1]


def metric(d, name, **labels):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % d.ports[2], timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def mailbox(d):
    path = os.path.join(d.tmp, "mailbox")
    return open(path, "rb").read().decode() if os.path.exists(path) else ""


def test_spf_fail_is_refused_at_mail_with_550_5_7_23_logged_and_counted(env):
    d, _, _ = env
    before = metric(d, "pmaster_smtpd_rejections_total", listener="reject", reason="spf")
    with client(d) as c:
        reply = c.cmd("MAIL FROM:<a@fail.test>")[-1]
        assert reply.startswith("550 5.7.23 ")
        assert c.cmd("MAIL FROM:<a@pass.test>")[-1].startswith("250")  # the session goes on
    wait_until(lambda: re.search(r"reject: MAIL from \[127\.0\.0\.1\]: 550 5\.7\.23 .*from=<a@fail\.test>",
                                 d.log_text()), 10, "the reject log line")
    assert metric(d, "pmaster_smtpd_rejections_total", listener="reject", reason="spf") == before + 1
    assert metric(d, "pmaster_spf_results_total", listener="reject", result="fail") >= 1


def test_spf_dns_timeout_is_refused_with_451_4_7_24_and_the_daemon_keeps_serving(env):
    d, _, _ = env
    with client(d) as c:
        assert c.cmd("MAIL FROM:<a@slow.test>")[-1].startswith("451 4.7.24 ")
        assert c.cmd("MAIL FROM:<a@pass.test>")[-1].startswith("250")
    with client(d) as c:
        assert c.cmd("NOOP")[-1].startswith("250")


def test_spf_null_sender_is_checked_with_the_helo_identity(env):
    d, _, _ = env
    with RawClient("127.0.0.1", d.port) as c:
        c.cmd("EHLO helofail.test")
        assert c.cmd("MAIL FROM:<>")[-1].startswith("550 5.7.23 ")


def test_spf_softfail_is_accepted_and_tagged_in_reject_mode(env):
    d, _, _ = env
    with client(d) as c:
        assert c.cmd("MAIL FROM:<a@soft.test>")[-1].startswith("250")
        assert c.cmd("RCPT TO:<soft@example.org>")[-1].startswith("250")
        send_message(c, "Subject: soft\n\nbody\n")
    wait_until(lambda: "Subject: soft" in mailbox(d), 15, "delivery")
    assert "spf=softfail smtp.mailfrom=soft.test" in mailbox(d)


def test_spf_tag_mode_prepends_received_spf_and_authentication_results_and_drops_forged_ones(env):
    d, _, _ = env
    with client(d, port=d.ports[1]) as c:
        assert c.cmd("MAIL FROM:<a@fail.test>")[-1].startswith("250")  # tag: never refused
        assert c.cmd("RCPT TO:<tag@example.org>")[-1].startswith("250")
        send_message(c, "Authentication-Results: mx.test; spf=pass smtp.mailfrom=fail.test\n"
                        "Authentication-Results: upstream.test; spf=pass\nSubject: tagged\n\nbody\n")
    wait_until(lambda: "Subject: tagged" in mailbox(d), 15, "delivery")
    msg = mailbox(d).split("Subject: tagged")[0]
    msg = msg[msg.rfind("Received-SPF:"):]
    assert msg.startswith("Received-SPF: Fail (mx.test: domain of fail.test does not designate 127.0.0.1")
    head = msg.replace("\r\n\t", " ")
    assert head.index("Authentication-Results: mx.test; spf=fail smtp.mailfrom=fail.test") < head.index("Received:")
    assert "spf=pass smtp.mailfrom=fail.test" not in head  # the forged claim of our authserv-id is gone
    assert "Authentication-Results: upstream.test; spf=pass" in head


def test_dnsbl_listed_client_is_refused_at_rcpt_with_554_5_7_1_and_the_zones_text(env):
    d, _, _ = env
    before = metric(d, "pmaster_dnsbl_hits_total", listener="reject", zone="bl.test")
    with client(d, source="127.0.0.2") as c:
        assert c.cmd("MAIL FROM:<a@pass.test>")[-1].startswith("250")
        reply = c.cmd("RCPT TO:<x@example.org>")[-1]
    assert reply == ("554 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test; "
                     "Listed by bl.test, see https://bl.test/127.0.0.2")
    wait_until(lambda: "reject: RCPT from [127.0.0.2]: 554 5.7.1" in d.log_text(), 10, "the reject log line")
    assert metric(d, "pmaster_dnsbl_hits_total", listener="reject", zone="bl.test") == before + 1
    assert metric(d, "pmaster_smtpd_rejections_total", listener="reject", reason="dnsbl") >= 1


def test_dnsbl_skips_trusted_networks_clients(env):
    d, dns, _ = env
    with client(d) as c:
        c.cmd("MAIL FROM:<a@pass.test>")
        assert c.cmd("RCPT TO:<x@example.org>")[-1].startswith("250")
    assert not any(q[0].endswith(".0.0.127.bl.test") and q[0].startswith("1.") for q in dns.queries)


def test_dnsbl_unlisted_client_is_accepted(env):
    d, _, _ = env
    with client(d, source="127.0.0.3") as c:
        c.cmd("MAIL FROM:<a@pass.test>")
        assert c.cmd("RCPT TO:<x@example.org>")[-1].startswith("250")


def test_dnsbl_timeout_counts_as_not_listed_and_is_logged(env):
    d, _, _ = env
    with client(d, source="127.0.0.4") as c:
        c.cmd("MAIL FROM:<a@pass.test>")
        assert c.cmd("RCPT TO:<x@example.org>")[-1].startswith("250")
    wait_until(lambda: "look-up of [127.0.0.4] in slowbl.test failed" in d.log_text(), 10, "the log line")


def test_verify_accepts_what_the_relay_accepts_with_one_probe_session_per_transaction(env):
    d, _, inside = env
    sessions = len(inside.sessions)
    with client(d) as c:
        c.cmd("MAIL FROM:<a@pass.test>")
        assert c.cmd("RCPT TO:<alice@inside.test>")[-1].startswith("250")
        assert c.cmd("RCPT TO:<bob@inside.test>")[-1].startswith("250")
        assert c.cmd("RSET")[-1].startswith("250")
    wait_until(lambda: inside.sessions[sessions:] and not inside.open_sessions, 10, "the probe's QUIT")
    probe = inside.sessions[sessions]
    verbs = [x.split(" ")[0].upper() for x in probe.commands]
    assert verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "QUIT"]
    assert probe.commands[1].upper() == "MAIL FROM:<>"


def test_verify_refusal_of_the_relay_is_550_5_1_1_with_its_text(env):
    d, _, _ = env
    with client(d) as c:
        c.cmd("MAIL FROM:<a@pass.test>")
        reply = c.cmd("RCPT TO:<nobody@inside.test>")[-1]
    assert reply.startswith("550 5.1.1 ") and "550 5.1.1 <nobody@inside.test>: no such user" in reply
    assert metric(d, "pmaster_smtpd_rejections_total", listener="reject", reason="verify") >= 1


def test_verify_4xx_of_the_relay_is_450_4_1_1(env):
    d, _, _ = env
    with client(d) as c:
        c.cmd("MAIL FROM:<a@pass.test>")
        assert c.cmd("RCPT TO:<busy@inside.test>")[-1].startswith("450 4.1.1 ")


def test_verify_relay_that_hangs_during_the_probe_is_450_4_1_1_and_the_daemon_keeps_serving(env):
    d, _, _ = env
    with client(d) as c:
        c.cmd("MAIL FROM:<a@pass.test>")
        assert c.cmd("RCPT TO:<who@hang.test>")[-1].startswith("450 4.1.1 ")
        assert c.cmd("RCPT TO:<ok@example.org>")[-1].startswith("250")


def test_verify_answers_are_cached_across_transactions(env):
    d, _, inside = env
    with client(d) as c:
        c.cmd("MAIL FROM:<a@pass.test>")
        assert c.cmd("RCPT TO:<carol@inside.test>")[-1].startswith("250")
    wait_until(lambda: not inside.open_sessions, 10, "the probe's QUIT")
    sessions = len(inside.sessions)
    with client(d) as c:
        c.cmd("MAIL FROM:<a@pass.test>")
        assert c.cmd("RCPT TO:<carol@inside.test>")[-1].startswith("250")
        c.cmd("QUIT")
    assert len(inside.sessions) == sessions


