"""policy-service against real Debian peers: postgrey (greylisting over inet:) and policyd-spf (over exec:,
pointed at a DNS server on loopback)."""

import grp
import os
import pwd
import socket
import subprocess
import time

import pytest
from dnslib import QTYPE, RR, TXT

from pmaster.tests.daemon_fixture import free_port, wait_until
from pmaster.tests.dnsserver import TTL, DnsServer
from pmaster.tests.test_policy_service import CONFIG, _rcpt, _send, _smtpd

POSTGREY = "/usr/sbin/postgrey"
POLICYD_SPF = "/usr/bin/policyd-spf"
DELAY = 2


def _port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture
def postgrey(tmp_path):
    """Debian's postgrey in the foreground on a loopback port, its database and whitelists in tmp."""
    if not os.access(POSTGREY, os.X_OK):
        raise RuntimeError("postgrey is not installed (.ci/run installs it)")
    dbdir = tmp_path / "postgrey"
    dbdir.mkdir()
    empty = tmp_path / "empty-whitelist"
    empty.write_text("")
    port = free_port()
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    log = open(tmp_path / "postgrey.log", "wb")
    proc = subprocess.Popen([POSTGREY, "--inet=127.0.0.1:%d" % port, "--dbdir=%s" % dbdir, "--delay=%d" % DELAY,
                             "--user=%s" % user, "--group=%s" % group, "--whitelist-clients=%s" % empty,
                             "--whitelist-recipients=%s" % empty], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_until(lambda: proc.poll() is not None or _port_open(port), timeout=20, what="postgrey to listen")
        assert proc.poll() is None, (tmp_path / "postgrey.log").read_text()
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_postgrey_greylists_the_first_attempt_and_accepts_the_retry_after_the_delay(tmp_path, postgrey):
    with _smtpd(tmp_path, "inet:127.0.0.1:%d" % postgrey) as srv:
        c, first = _rcpt(srv)
        assert first[0].startswith("450 4.7.1 <u@example.org>: Recipient address rejected: Greylisted")
        c.close()
        started = time.monotonic()
        # Retry as a sending MTA would, until postgrey's delay has passed (bounded).
        while True:
            c, reply = _rcpt(srv)
            if reply[0].startswith("250") or time.monotonic() - started > DELAY + 15:
                break
            assert reply[0].startswith("450")
            c.close()
            time.sleep(0.5)
        assert reply[0].startswith("250"), reply
        assert time.monotonic() - started >= DELAY - 1
        assert _send(c)[0].startswith("250")
        body = srv.body(srv.queue_ids()[0])
    assert body.startswith(b"X-Greylist: delayed ")
    assert b"by postgrey-" in body.split(b"\r\n", 1)[0]
    assert body.split(b"\r\n")[1].startswith(b"Received: from client.test")


# -- policyd-spf

SPF_CONF = """\
debugLevel = 1
TestOnly = 1
HELO_reject = Fail
Mail_From_reject = Fail
PermError_reject = False
TempError_Defer = False
skip_addresses = 192.0.2.0/24
"""

# policyd-spf (pyspf through pydns on Debian) reads /etc/resolv.conf and has no setting for another
# server: this module, first on its PYTHONPATH, points pydns at the test's DNS before pyspf imports it.
SITECUSTOMIZE = """\
import DNS
DNS.defaults["server"] = ["127.0.0.1"]
DNS.defaults["port"] = %d
"""


class _SpfDns(DnsServer):
    """The test DNS server with TXT records (SPF policies)."""

    @staticmethod
    def _rrs(qname, qtype, entry):
        if qtype == "TXT":
            return [RR(qname, QTYPE.TXT, ttl=TTL, rdata=TXT(t)) for t in entry.get("TXT", [])]
        return DnsServer._rrs(qname, qtype, entry)


SPF_RECORDS = {
    "pass.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
    "fail.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "client.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
}


@pytest.fixture
def policyd_spf(tmp_path):
    if not os.access(POLICYD_SPF, os.X_OK):
        raise RuntimeError("policyd-spf is not installed (.ci/run installs postfix-policyd-spf-python)")
    with _SpfDns(SPF_RECORDS, zones=("test",)) as dns:
        site = tmp_path / "spf-site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE % dns.address[1])
        conf = tmp_path / "policyd-spf.conf"
        conf.write_text(SPF_CONF)
        yield "exec:/usr/bin/env PYTHONPATH=%s %s %s" % (site, POLICYD_SPF, conf), dns


def _spf_session(srv, sender):
    c = srv.client()
    assert c.cmd("EHLO client.test")[-1].startswith("250")
    assert c.cmd("MAIL FROM:<%s>" % sender)[0].startswith("250")
    return c, c.cmd("RCPT TO:<u@example.org>")


def _spf_config():
    return CONFIG.replace("policy-service-timeout = 2", "policy-service-timeout = 20")


def test_policyd_spf_through_exec_prepends_received_spf_on_pass(tmp_path, policyd_spf):
    service, dns = policyd_spf
    with _smtpd(tmp_path, service, _spf_config()) as srv:
        c, reply = _spf_session(srv, "someone@pass.test")
        assert reply[0].startswith("250"), reply
        assert _send(c)[0].startswith("250")
        body = srv.body(srv.queue_ids()[0])
    first = body.split(b"\r\n", 1)[0]
    assert first.startswith(b"Received-SPF: Pass"), body[:300]
    assert ("pass.test", "TXT") in dns.queries


def test_policyd_spf_through_exec_rejects_a_fail(tmp_path, policyd_spf):
    service, dns = policyd_spf
    with _smtpd(tmp_path, service, _spf_config()) as srv:
        _, reply = _spf_session(srv, "someone@fail.test")
    assert reply[0].startswith("550 5.7.23 <u@example.org>: Recipient address rejected: Message rejected due to: "
                               "SPF fail"), reply
    assert ("fail.test", "TXT") in dns.queries


def test_policyd_spf_program_is_kept_running_between_sessions(tmp_path, policyd_spf):
    service, _ = policyd_spf
    with _smtpd(tmp_path, service, _spf_config()) as srv:
        _spf_session(srv, "a@pass.test")
        client = next(iter(srv.runtime.resources._objects.values()))
        pids = {conn.proc.pid for conn in client._idle}
        _spf_session(srv, "b@pass.test")
        assert {conn.proc.pid for conn in client._idle} == pids and len(pids) == 1


