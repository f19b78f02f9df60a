"""STARTTLS in the SMTP server: offer, injection, session restart, require-tls (SPEC 4, issue 3 point 4)."""

import smtplib
import ssl
import subprocess

import pytest
import trustme

from pmaster.tests.daemon_fixture import InProcessSmtpd, RawClient

CONFIG = """\
[core]
  hostname = mx.test
  spool-directory = {spool}
  pid-file = {tmp}/run/pmaster.pid
  min-free-space = 1k

[smtpd test]
  name = mx.test
  listen-port = 127.0.0.1:{port}
  tls-certificate = {cert}
  tls-key = {key}
  require-tls = {require}
  timeout = 10s

[route]
  @example.org  pipe(cat >/dev/null)
"""


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def _serve(tmp_path, ca, require="no"):
    cert = ca.issue_cert("mx.test", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return InProcessSmtpd(tmp_path, CONFIG, values={"cert": cert_path, "key": key_path, "require": require})


@pytest.fixture
def server(tmp_path, ca):
    with _serve(tmp_path, ca) as srv:
        yield srv


def client_context(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class TlsClient(RawClient):
    """RawClient that can switch to TLS after a 220 to STARTTLS."""

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.buf == b"", "plaintext left over before the handshake: %r" % self.buf
        self.sock = ctx.wrap_socket(self.sock, server_hostname="mx.test")


def code(reply) -> str:
    return " ".join(reply[-1].split()[:2])


def tls_client(server, ca):
    c = TlsClient(server.host, server.port)
    c.cmd("EHLO client.test")
    assert code(c.cmd("STARTTLS")) == "220 2.0.0"
    c.starttls(client_context(ca))
    return c


def test_starttls_is_offered_only_before_tls(server, ca):
    c = TlsClient(server.host, server.port)
    assert "STARTTLS" in [line[4:] for line in c.cmd("EHLO client.test")]
    assert code(c.cmd("STARTTLS")) == "220 2.0.0"
    c.starttls(client_context(ca))
    reply = c.cmd("EHLO client.test")
    assert reply[0] == "250-mx.test"
    assert not any("STARTTLS" in line for line in reply)
    c.close()


def test_input_after_starttls_in_the_same_packet_is_discarded(server, ca):
    c = TlsClient(server.host, server.port)
    c.cmd("EHLO client.test")
    c.send(b"STARTTLS\r\nRSET\r\n")
    assert code(c.reply()) == "220 2.0.0"
    c.starttls(client_context(ca))
    reply = c.cmd("EHLO after.test")
    assert reply[0] == "250-mx.test", "a reply to the injected RSET came first: %r" % reply
    assert code(c.cmd("NOOP")) == "250 2.0.0"
    c.close()


def test_session_starts_over_after_tls(server, ca):
    c = TlsClient(server.host, server.port)
    c.cmd("EHLO client.test")
    assert code(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0"
    assert code(c.cmd("STARTTLS")) == "220 2.0.0"
    c.starttls(client_context(ca))
    assert code(c.cmd("MAIL FROM:<a@sender.test>")) == "503 5.5.1"  # no EHLO yet over TLS
    c.cmd("EHLO client.test")
    assert code(c.cmd("RCPT TO:<joe@example.org>")) == "503 5.5.1"  # the old MAIL is gone
    c.close()


def test_second_starttls_answers_503(server, ca):
    c = tls_client(server, ca)
    c.cmd("EHLO client.test")
    assert code(c.cmd("STARTTLS")) == "503 5.5.1"
    assert code(c.cmd("NOOP")) == "250 2.0.0"
    c.close()


def test_starttls_with_an_argument_answers_501(server):
    c = RawClient(server.host, server.port)
    c.cmd("EHLO client.test")
    assert code(c.cmd("STARTTLS now")) == "501 5.5.4"
    c.close()


def test_starttls_without_certificate_answers_502(tmp_path):
    config = CONFIG.replace("  tls-certificate = {cert}\n  tls-key = {key}\n", "")
    with InProcessSmtpd(tmp_path, config, values={"require": "no"}) as srv, srv.client() as c:
        c.cmd("EHLO client.test")
        assert code(c.cmd("STARTTLS")) == "502 5.5.1"


def test_failed_handshake_does_not_hurt_the_server(server):
    c = RawClient(server.host, server.port)
    c.cmd("EHLO client.test")
    assert code(c.cmd("STARTTLS")) == "220 2.0.0"
    c.send(b"this is not a TLS client hello\r\n" * 10)
    assert c.closed()
    with server.client() as d:
        assert code(d.cmd("NOOP")) == "250 2.0.0"


def test_require_tls_refuses_mail_before_starttls(tmp_path, ca):
    with _serve(tmp_path, ca, require="yes") as srv:
        c = TlsClient(srv.host, srv.port)
        c.cmd("EHLO client.test")
        assert code(c.cmd("MAIL FROM:<a@sender.test>")) == "530 5.7.0"
        assert code(c.cmd("STARTTLS")) == "220 2.0.0"
        c.starttls(client_context(ca))
        c.cmd("EHLO client.test")
        assert code(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0"
        c.close()


def test_message_over_tls_says_esmtps_and_records_tls(server, ca):
    c = tls_client(server, ca)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@sender.test>")
    c.cmd("RCPT TO:<joe@example.org>")
    assert c.cmd("DATA")[0].startswith("354")
    c.send(b"Subject: tls\r\n\r\nsecret\r\n" + b"z" * 50000 + b"\r\n.\r\n")
    reply = c.reply()
    assert code(reply) == "250 2.0.0"
    qid = reply[-1].split()[-1]
    c.close()
    body = server.body(qid)
    assert b"with ESMTPS id %s" % qid.encode() in body
    env = server.envelope(qid)
    assert env["tls"] and env["tls"].startswith("TLSv1.")
    assert b"z" * 50000 in body


def test_smtplib_starttls_sends_a_message(server, ca):
    with smtplib.SMTP(server.host, server.port, timeout=10) as s:
        s.ehlo("py.test")
        assert s.has_extn("starttls")
        s._host = "mx.test"  # smtplib checks the certificate against the host it connected to
        s.starttls(context=client_context(ca))
        s.ehlo("py.test")
        assert not s.has_extn("starttls")
        s.sendmail("a@sender.test", ["joe@example.org"], b"Subject: py\r\n\r\nhi\r\n")
    (qid,) = server.queue_ids()
    assert server.envelope(qid)["tls"]


def test_swaks_starttls_sends_a_message(server):
    result = subprocess.run(["/usr/bin/swaks", "--server", "%s:%d" % (server.host, server.port), "--tls",
                             "--from", "a@sender.test", "--to", "joe@example.org", "--body", "over tls"],
                            capture_output=True, timeout=30)
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, out
    (qid,) = server.queue_ids()
    assert b"with ESMTPS" in server.body(qid)


def test_plaintext_client_still_works_on_a_tls_listener(server):
    with server.client() as c:
        c.cmd("EHLO plain.test")
        assert code(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0"
