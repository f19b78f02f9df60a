"""Recipient verification (pmaster/policy/verify.py) against real SMTP servers on loopback (smtpsink)."""

import socket
import threading
import time
from types import SimpleNamespace

import pytest
import trustme

from pmaster.config import RelayConfig
from pmaster.policy.verify import NEGATIVE_TTL, POSITIVE_TTL, Verdict, VerifyCache, VerifyCheck
from pmaster.tests.smtpsink import SmtpSink, tls_server_context


class Tx:
    """The caller's side of a transaction: collects on_close callbacks and runs them at ``end``."""

    def __init__(self):
        self.prepend = []
        self.closers = []

    def on_close(self, fn):
        self.closers.append(fn)

    def end(self):
        for fn in self.closers:
            fn()


def relay_for(*addresses, **kw):
    kw.setdefault("tls", "none")
    return RelayConfig(ident="inside", name="inside.test", addresses=tuple(addresses), verify_recipients=True, **kw)


def checker(relay, cache=None, timeout=3.0):
    target = SimpleNamespace(address=None, mailer="relay", name=relay.ident)

    def resolve(address):
        return [SimpleNamespace(address=address.lower(), mailer=target.mailer, name=target.name)]

    return VerifyCheck({relay.ident: relay}, resolve, cache if cache is not None else VerifyCache(), "mx.test",
                       timeout=timeout)


def view(rcpt):
    return SimpleNamespace(listener="mx", client_address="127.0.0.2", helo="client.test", mail_from="a@b.test",
                           recipients=(), recipient=rcpt, size=0)


def addr(sink):
    return "%s:%d" % sink.address


def test_address_the_relay_accepts_is_accepted_and_no_data_is_sent():
    with SmtpSink() as sink:
        tx = Tx()
        assert checker(relay_for(addr(sink))).check("rcpt", view("bob@inside.test"), tx) is None
        tx.end()
        cmds = [c.split(" ")[0].upper() for c in sink.sessions[0].commands]
    assert cmds[:3] == ["EHLO", "MAIL", "RCPT"]
    assert "DATA" not in cmds
    assert sink.sessions[0].commands[1].upper() == "MAIL FROM:<>"


def test_address_the_relay_refuses_gets_550_5_1_1_with_the_relays_text():
    with SmtpSink(rcpt_replies={"nobody@inside.test": "550 5.1.1 <nobody@inside.test>: no such user"}) as sink:
        reply = checker(relay_for(addr(sink))).check("rcpt", view("nobody@inside.test"), Tx())
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert "550 5.1.1 <nobody@inside.test>: no such user" in reply.text


def test_relay_4xx_gets_450_4_1_1():
    with SmtpSink(rcpt_replies={"busy@inside.test": "451 4.3.0 try later"}) as sink:
        reply = checker(relay_for(addr(sink))).check("rcpt", view("busy@inside.test"), Tx())
    assert (reply.code, reply.enhanced) == (450, "4.1.1")
    assert "451 4.3.0 try later" in reply.text


def test_unreachable_relay_gets_450_4_1_1():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    reply = checker(relay_for("127.0.0.1:%d" % port)).check("rcpt", view("bob@inside.test"), Tx())
    assert (reply.code, reply.enhanced) == (450, "4.1.1")


def test_relay_that_hangs_before_its_greeting_gets_450_within_the_timeout():
    with SmtpSink(greeting_delay=8) as sink:
        started = time.monotonic()
        reply = checker(relay_for(addr(sink)), timeout=1.0).check("rcpt", view("bob@inside.test"), Tx())
        assert time.monotonic() - started < 5
    assert (reply.code, reply.enhanced) == (450, "4.1.1")


class _SilentAtRcpt(threading.Thread):
    """Greets, answers EHLO and MAIL, then never answers RCPT: a relay that hangs in the middle of the probe."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(10)
        self.stop = threading.Event()
        self.conns = []

    def run(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conns.append(conn)
        conn.settimeout(10)
        conn.sendall(b"220 hang.test ESMTP\r\n")
        f = conn.makefile("rb")
        for _ in range(3):
            line = f.readline()
            if not line or line.upper().startswith(b"RCPT"):
                break
            conn.sendall(b"250 ok\r\n")
        self.stop.wait(10)
        conn.close()


def test_relay_that_hangs_at_rcpt_gets_450_and_later_rcpts_do_not_wait_again():
    server = _SilentAtRcpt()
    server.start()
    try:
        check = checker(relay_for("127.0.0.1:%d" % server.sock.getsockname()[1]), timeout=1.0)
        tx = Tx()
        started = time.monotonic()
        first = check.check("rcpt", view("a@inside.test"), tx)
        second = check.check("rcpt", view("b@inside.test"), tx)
        assert time.monotonic() - started < 5
        tx.end()
    finally:
        server.stop.set()
        server.sock.close()
    assert (first.code, first.enhanced, second.code) == (450, "4.1.1", 450)


def test_hosts_are_tried_in_order_until_one_answers():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    with SmtpSink() as sink:
        reply = checker(relay_for("127.0.0.1:%d" % dead, addr(sink))).check("rcpt", view("bob@inside.test"), Tx())
        assert reply is None and len(sink.sessions) == 1


def test_relay_port_and_helo_name_are_used():
    with SmtpSink() as sink:
        relay = relay_for("127.0.0.1", port=sink.address[1], helo_name="backup-mx.test")
        assert checker(relay).check("rcpt", view("bob@inside.test"), Tx()) is None
        assert sink.sessions[0].commands[0].lower() == "ehlo backup-mx.test"


def test_one_probe_session_serves_every_rcpt_of_a_transaction_and_quits_at_its_end():
    with SmtpSink() as sink:
        check = checker(relay_for(addr(sink)))
        tx = Tx()
        for rcpt in ("a@inside.test", "b@inside.test", "c@inside.test"):
            assert check.check("rcpt", view(rcpt), tx) is None
        assert check.open_probes() == 1
        tx.end()
        assert check.open_probes() == 0
        deadline = time.monotonic() + 5
        while sink.open_sessions and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(sink.sessions) == 1
        assert [c.split(" ")[0].upper() for c in sink.sessions[0].commands] == ["EHLO", "MAIL", "RCPT", "RCPT",
                                                                                  "RCPT", "QUIT"]


def test_verdicts_are_cached_positive_and_negative():
    with SmtpSink(rcpt_replies={"no@inside.test": "550 5.1.1 unknown"}) as sink:
        check = checker(relay_for(addr(sink)))
        for _ in range(2):
            tx = Tx()
            assert check.check("rcpt", view("yes@inside.test"), tx) is None
            assert check.check("rcpt", view("NO@inside.test"), tx).code == 550
            tx.end()
        assert len(sink.sessions) == 1


def test_temporary_answers_are_not_cached():
    with SmtpSink(rcpt_replies={"busy@inside.test": "452 4.2.2 full"}) as sink:
        check = checker(relay_for(addr(sink)))
        for _ in range(2):
            tx = Tx()
            assert check.check("rcpt", view("busy@inside.test"), tx).code == 450
            tx.end()
        assert len(sink.sessions) == 2


def test_cache_lifetimes_are_a_day_for_accepted_and_an_hour_for_refused():
    clock = [0.0]
    cache = VerifyCache(now=lambda: clock[0])
    cache.put("r", "ok@x", Verdict(250, "ok"))
    cache.put("r", "bad@x", Verdict(550, "no"))
    clock[0] = NEGATIVE_TTL + 1
    assert (cache.get("r", "ok@x") is not None, cache.get("r", "bad@x")) == (True, None)
    clock[0] = POSITIVE_TTL + 1
    assert cache.get("r", "ok@x") is None


def test_cache_is_bounded():
    cache = VerifyCache(size=3)
    for i in range(10):
        cache.put("r", "u%d@x" % i, Verdict(250, "ok"))
    assert len(cache) == 3 and cache.get("r", "u9@x") is not None and cache.get("r", "u0@x") is None


def test_recipient_routed_elsewhere_is_not_probed():
    check = VerifyCheck({"inside": relay_for("127.0.0.1:9")},
                        lambda a: [SimpleNamespace(address=a, mailer="pipe", name="local")], VerifyCache(), "mx.test")
    assert check.check("rcpt", view("bob@example.org"), Tx()) is None


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def test_tls_required_verifies_the_relays_certificate(ca, tmp_path):
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    with SmtpSink(tls_context=tls_server_context(ca, "localhost")) as sink:
        relay = relay_for("localhost:%d" % sink.address[1], tls="required", tls_ca_file=str(cafile))
        assert checker(relay).check("rcpt", view("bob@inside.test"), Tx()) is None
        assert sink.sessions[0].tls


def test_tls_required_with_an_untrusted_certificate_gets_450(ca):
    with SmtpSink(tls_context=tls_server_context(ca, "localhost")) as sink:
        relay = relay_for("localhost:%d" % sink.address[1], tls="required")  # system store: trustme CA unknown
        assert checker(relay).check("rcpt", view("bob@inside.test"), Tx()).code == 450


def test_tls_required_without_starttls_gets_450():
    with SmtpSink() as sink:
        assert checker(relay_for(addr(sink), tls="required")).check("rcpt", view("bob@inside.test"), Tx()).code == 450


def test_opportunistic_tls_is_used_unverified_when_offered(ca):
    with SmtpSink(tls_context=tls_server_context(ca, "other.name")) as sink:
        assert checker(relay_for(addr(sink), tls="opportunistic")).check("rcpt", view("b@inside.test"), Tx()) is None
        assert sink.sessions[0].tls


def test_opportunistic_tls_that_breaks_falls_back_to_plaintext():
    with SmtpSink(broken_tls=True) as sink:
        assert checker(relay_for(addr(sink), tls="opportunistic")).check("rcpt", view("b@inside.test"), Tx()) is None
        assert len(sink.sessions) == 2 and not sink.sessions[1].tls
