"""Tests for the relay mailer and the DNS resolver: real SMTP sinks and a real DNS server on loopback."""

import hashlib
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest
import trustme

from pmaster.config import Config, RelayConfig
from pmaster.dnsresolve import DnsTempError, NoSuchDomain, NullMX, Resolver
from pmaster.envelope import Envelope, Recipient
from pmaster.mailers import OK, PERMFAIL, TEMPFAIL, Delivery, relay
from pmaster.spool import record_trailer
from pmaster.tests.dnsserver import DnsServer
from pmaster.tests.smtpsink import SmtpSink, tls_server_context

FAST = relay.Timeouts(connect=2, command=3, data_init=3, data_block=3, data_end=3, quit=1)
BODY = b"Subject: test\r\nFrom: s@src.test\r\n\r\nhello\r\n"
NO_DNS = Resolver(("127.0.0.1", 9), timeout=1)  # for tests whose hosts are IP literals


# -- helpers and fixtures -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_refused_memo(monkeypatch):
    """Each test gets its own memo: ports are reused between tests of one process."""
    memo = relay.RefusedHosts()
    monkeypatch.setattr(relay, "REFUSED", memo)
    return memo


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """Each test gets its own connection cache, whose sessions are QUIT at the end of the test."""
    cache = relay.ConnectionCache()
    monkeypatch.setattr(relay, "CACHE", cache)
    yield cache
    cache.close_all()


@pytest.fixture
def refused_port():
    """A loopback port that refuses connections: bound, never listening, held for the test."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def make_delivery(tmp_path, rcpts, body=BODY, sender="s@src.test", body_type="7BIT", deadline=None):
    recipients = [Recipient(address=a, original=a, mailer="relay", target="relay()") for a in rcpts]
    env = Envelope(queue_id="Q1", sender=sender, recipients=recipients, arrival=time.time(),
                   size=len(body), body_type=body_type)
    path = tmp_path / "body"
    path.write_bytes(body + record_trailer(len(body), env))  # a spool record, as the scheduler passes
    return Delivery("Q1", env, recipients, str(path), Config(path="x"), deadline=deadline)


def hostport(sink):
    return "%s:%d" % sink.address


def send(delivery, hosts=None, relay_cfg=None, resolver=NO_DNS, **kw):
    kw.setdefault("timeouts", FAST)
    return relay.deliver(delivery, relay_cfg, hosts, resolver, **kw)


def statuses(results):
    return [r.status for r in results]


def two_sinks_on_one_port(**second):
    """Sinks on 127.0.0.1:P and 127.0.0.2:P (MX records cannot carry a port); retried if P is taken."""
    for _ in range(10):
        first = SmtpSink().start()
        try:
            other = SmtpSink(host="127.0.0.2", port=first.port, **second).start()
        except OSError:
            first.close()
            continue
        return first, other
    raise OSError("no common port for two sinks")


MX_RECORDS = {
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.1"]},
    "implicit.test": {"A": ["127.0.0.1"]},
    "nomail.test": {"MX": [(0, ".")]},
    "smart.example.test": {"A": ["127.0.0.1"]},
    "v6.example.test": {"AAAA": ["::1"], "A": ["127.0.0.1"]},
    "alias.example.test": {"CNAME": "smart.example.test"},
}


@pytest.fixture(scope="module")
def dns_server():
    with DnsServer(MX_RECORDS, zones=("test",), timeout_names=("slow.test",),
                   servfail_names=("broken.test",)) as server:
        yield server


@pytest.fixture
def resolver(dns_server):
    return Resolver(dns_server.address, timeout=1)


# -- basic delivery -----------------------------------------------------------------------------------


def test_delivers_message_and_envelope_to_sink(tmp_path):
    with SmtpSink() as sink:
        results = send(make_delivery(tmp_path, ["a@x.test", "b@x.test"]), hosts=(hostport(sink),))
    assert statuses(results) == [OK, OK]
    assert results[0].reply.startswith("250 2.0.0")
    (msg,) = sink.messages
    assert msg.mail_from == "s@src.test"
    assert msg.rcpts == ["a@x.test", "b@x.test"]
    assert msg.data == BODY
    assert msg.ehlo == "localhost"


def test_null_sender_is_sent_as_empty_path(tmp_path):
    with SmtpSink() as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"], sender=""), hosts=(hostport(sink),))
    assert statuses(results) == [OK]
    assert sink.messages[0].mail_from == ""
    assert "MAIL FROM:<>" in sink.sessions[0].commands[1]


def test_one_rejected_recipient_of_three_gets_permfail_with_remote_reply(tmp_path):
    reply = "550 5.1.1 <b@x.test>: no such user"
    with SmtpSink(rcpt_replies={"b@x.test": reply}) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test", "b@x.test", "c@x.test"]), hosts=(hostport(sink),))
    assert statuses(results) == [OK, PERMFAIL, OK]
    assert results[1].reply == reply
    assert results[1].enhanced == "5.1.1"
    assert sink.messages[0].rcpts == ["a@x.test", "c@x.test"]


def test_452_for_one_recipient_defers_only_that_one(tmp_path):
    with SmtpSink(rcpt_replies={"b@x.test": "452 4.5.3 Too many recipients"}) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test", "b@x.test"]), hosts=(hostport(sink),))
    assert statuses(results) == [OK, TEMPFAIL]
    assert results[1].reply == "452 4.5.3 Too many recipients"


def test_451_after_data_gives_tempfail_for_all(tmp_path):
    with SmtpSink(tempfail_first=1) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test", "b@x.test"]), hosts=(hostport(sink),))
    assert statuses(results) == [TEMPFAIL, TEMPFAIL]
    assert results[0].reply == "451 4.3.0 Try again later"
    assert sink.messages == []


def test_5xx_after_data_gives_permfail_for_accepted_recipients_only(tmp_path):
    with SmtpSink(data_reply="554 5.7.1 Spam", rcpt_replies={"b@x.test": "450 4.2.0 busy"}) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test", "b@x.test"]), hosts=(hostport(sink),))
    assert statuses(results) == [PERMFAIL, TEMPFAIL]
    assert results[0].reply == "554 5.7.1 Spam"


def test_helo_is_used_when_ehlo_gets_5xx(tmp_path):
    with SmtpSink(ehlo_reply="502 5.5.1 EHLO not implemented") as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
    assert statuses(results) == [OK]
    assert sink.sessions[0].commands[1].upper().startswith("HELO")


def test_helo_name_comes_from_relay_section(tmp_path):
    with SmtpSink() as sink:
        cfg = RelayConfig("smart", "smart", addresses=(hostport(sink),), helo_name="out.src.test")
        send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg)
    assert sink.messages[0].ehlo == "out.src.test"


def test_mail_from_carries_size_and_body_8bitmime(tmp_path):
    body = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode("utf-8")
    with SmtpSink(size_limit=10000) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"], body=body, body_type="8BITMIME"),
                       hosts=(hostport(sink),))
    assert statuses(results) == [OK]
    assert sink.messages[0].mail_params == ["SIZE=%d" % len(body), "BODY=8BITMIME"]
    assert sink.messages[0].data == body


def test_message_over_advertised_size_is_permfail_552(tmp_path):
    with SmtpSink(size_limit=10) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test", "b@x.test"]), hosts=(hostport(sink),))
    assert statuses(results) == [PERMFAIL, PERMFAIL]
    assert results[0].reply.startswith("552 5.3.4 ")
    assert not any(c.upper().startswith("MAIL") for c in sink.sessions[0].commands)


# -- host fallback ------------------------------------------------------------------------------------


def test_falls_back_to_second_host_when_first_refuses_connection(tmp_path, refused_port, fresh_refused_memo):
    with SmtpSink() as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=("127.0.0.1:%d" % refused_port, hostport(sink)))
    assert statuses(results) == [OK]
    assert fresh_refused_memo.skipped("127.0.0.1", refused_port)


def test_falls_back_to_second_host_when_first_greets_421(tmp_path):
    with SmtpSink(greeting="421 4.3.2 busy") as first, SmtpSink() as second:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(first), hostport(second)))
    assert statuses(results) == [OK]
    assert len(second.messages) == 1


def test_falls_back_to_second_host_after_4xx_to_mail(tmp_path):
    with SmtpSink(mail_reply="451 4.3.0 later") as first, SmtpSink() as second:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(first), hostport(second)))
    assert statuses(results) == [OK]
    assert first.messages == [] and len(second.messages) == 1


def test_falls_back_to_second_host_after_421_to_first_rcpt(tmp_path):
    with SmtpSink(rcpt_replies={"a@x.test": "421 4.3.2 going down"}) as first, SmtpSink() as second:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(first), hostport(second)))
    assert statuses(results) == [OK]


def test_falls_back_when_first_host_stalls_past_command_timeout(tmp_path):
    short = relay.Timeouts(connect=2, command=0.5, data_init=3, data_block=3, data_end=3, quit=0.5)
    with SmtpSink(greeting_delay=2) as first, SmtpSink() as second:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(first), hostport(second)),
                       timeouts=short)
    assert statuses(results) == [OK]


def test_no_fallback_after_a_recipient_got_its_reply(tmp_path):
    with SmtpSink(drop_after_rcpt=1) as first, SmtpSink() as second:
        results = send(make_delivery(tmp_path, ["a@x.test", "b@x.test"]), hosts=(hostport(first), hostport(second)))
    assert statuses(results) == [TEMPFAIL, TEMPFAIL]
    assert "lost connection" in results[1].reply
    assert second.connections == 0


def test_every_host_failing_gives_tempfail_with_last_error(tmp_path):
    with SmtpSink(greeting="421 4.3.2 busy") as first, SmtpSink(greeting="554 5.3.2 no service") as second:
        results = send(make_delivery(tmp_path, ["a@x.test", "b@x.test"]), hosts=(hostport(first), hostport(second)))
    assert statuses(results) == [TEMPFAIL, TEMPFAIL]
    assert results[0].reply.startswith("554 5.3.2 no service")
    assert results[0].enhanced == "4.3.2"


def test_5xx_to_mail_on_last_host_is_permfail(tmp_path):
    with SmtpSink(greeting="421 4.3.2 busy") as first, SmtpSink(mail_reply="550 5.7.1 sender denied") as second:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(first), hostport(second)))
    assert statuses(results) == [PERMFAIL]
    assert results[0].reply.startswith("550 5.7.1 sender denied")


def test_refused_host_is_skipped_for_five_minutes_then_retried(tmp_path, monkeypatch):
    clock = [1000.0]
    memo = relay.RefusedHosts(now=lambda: clock[0])
    monkeypatch.setattr(relay, "REFUSED", memo)
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    port = hole.getsockname()[1]
    results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=("127.0.0.1:%d" % port,))
    assert statuses(results) == [TEMPFAIL]
    assert "refused" in results[0].reply.lower()
    hole.close()
    with SmtpSink(port=port) as sink:  # the host is back, but the memo still says no
        clock[0] += 299
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=("127.0.0.1:%d" % port,))
        assert statuses(results) == [TEMPFAIL]
        assert sink.connections == 0
        clock[0] += 2
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=("127.0.0.1:%d" % port,))
        assert statuses(results) == [OK]


def test_relay_section_tries_addresses_in_order(tmp_path, refused_port):
    with SmtpSink() as sink:
        cfg = RelayConfig("smart", "smart", addresses=("127.0.0.1:%d" % refused_port, hostport(sink)))
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg)
    assert statuses(results) == [OK]


def test_relay_section_name_uses_address_records_and_port(tmp_path, resolver):
    with SmtpSink() as sink:
        cfg = RelayConfig("smart", "smart.example.test", port=sink.port)
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg, resolver=resolver)
    assert statuses(results) == [OK]


def test_inline_host_name_follows_cname_to_addresses(tmp_path, resolver):
    with SmtpSink() as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=("alias.example.test:%d" % sink.port,),
                       resolver=resolver)
    assert statuses(results) == [OK]


def test_unknown_smart_host_defers(tmp_path, resolver):
    results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=("nohost.example.test:25",), resolver=resolver)
    assert statuses(results) == [TEMPFAIL]
    assert "not found" in results[0].reply


def test_passed_deadline_defers_without_connecting(tmp_path):
    with SmtpSink() as sink:
        delivery = make_delivery(tmp_path, ["a@x.test"], deadline=time.monotonic() - 1)
        results = send(delivery, hosts=(hostport(sink),))
    assert statuses(results) == [TEMPFAIL]
    assert sink.connections == 0


def test_deadline_during_session_defers(tmp_path):
    with SmtpSink(greeting_delay=2) as sink:
        delivery = make_delivery(tmp_path, ["a@x.test"], deadline=time.monotonic() + 0.5)
        start = time.monotonic()
        results = send(delivery, hosts=(hostport(sink),))
    assert statuses(results) == [TEMPFAIL]
    assert "deadline" in results[0].reply
    assert time.monotonic() - start < 1.5


# -- MX and DNS ---------------------------------------------------------------------------------------


def test_mx_delivery_uses_lowest_preference_first(tmp_path, resolver):
    low, preferred = two_sinks_on_one_port()  # mx1 (pref 10) is 127.0.0.2, mx2 (pref 20) is 127.0.0.1
    try:
        results = send(make_delivery(tmp_path, ["a@example.test"]), hosts=(), resolver=resolver, mx_port=low.port)
    finally:
        low.close()
        preferred.close()
    assert statuses(results) == [OK]
    assert len(preferred.messages) == 1 and low.messages == []


def test_mx_delivery_falls_back_to_next_preference(tmp_path, resolver):
    low, preferred = two_sinks_on_one_port(greeting="421 4.3.2 busy")
    try:
        results = send(make_delivery(tmp_path, ["a@example.test"]), hosts=(), resolver=resolver, mx_port=low.port)
    finally:
        low.close()
        preferred.close()
    assert statuses(results) == [OK]
    assert len(low.messages) == 1 and preferred.connections == 1


def test_implicit_mx_delivers_to_the_domain_address(tmp_path, resolver):
    with SmtpSink() as sink:
        results = send(make_delivery(tmp_path, ["a@implicit.test"]), hosts=(), resolver=resolver, mx_port=sink.port)
    assert statuses(results) == [OK]


def test_null_mx_is_permfail_5_1_10(tmp_path, resolver):
    results = send(make_delivery(tmp_path, ["a@nomail.test"]), hosts=(), resolver=resolver)
    assert statuses(results) == [PERMFAIL]
    assert results[0].enhanced == "5.1.10"
    assert "null MX" in results[0].reply


def test_nxdomain_is_permfail_5_1_2(tmp_path, resolver):
    results = send(make_delivery(tmp_path, ["a@nowhere.test", "b@nowhere.test"]), hosts=(), resolver=resolver)
    assert statuses(results) == [PERMFAIL, PERMFAIL]
    assert results[0].enhanced == "5.1.2"


def test_dns_timeout_is_tempfail(tmp_path, resolver):
    start = time.monotonic()
    results = send(make_delivery(tmp_path, ["a@slow.test"]), hosts=(), resolver=resolver)
    assert statuses(results) == [TEMPFAIL]
    assert results[0].enhanced == "4.4.3"
    assert time.monotonic() - start < 5


def test_mixed_domains_are_grouped_per_domain(tmp_path, resolver):
    with SmtpSink() as sink:
        results = send(make_delivery(tmp_path, ["a@implicit.test", "b@nomail.test"]), hosts=(),
                       resolver=resolver, mx_port=sink.port)
    assert statuses(results) == [OK, PERMFAIL]


def test_resolver_sorts_mx_by_preference(resolver):
    assert resolver.mx_hosts("Example.Test.") == [(10, "mx1.example.test"), (20, "mx2.example.test")]


def test_resolver_gives_implicit_mx_for_name_without_mx(resolver):
    assert resolver.mx_hosts("implicit.test") == [(0, "implicit.test")]


def test_resolver_raises_for_null_mx_nxdomain_timeout_and_servfail(resolver):
    with pytest.raises(NullMX):
        resolver.mx_hosts("nomail.test")
    with pytest.raises(NoSuchDomain):
        resolver.mx_hosts("nowhere.test")
    with pytest.raises(DnsTempError):
        resolver.mx_hosts("slow.test")
    with pytest.raises(DnsTempError):
        resolver.addresses("broken.test")


def test_resolver_addresses_ipv4_first_and_literals_as_is(resolver):
    assert resolver.addresses("v6.example.test") == ["127.0.0.1", "::1"]
    assert resolver.addresses("192.0.2.7") == ["192.0.2.7"]
    assert resolver.addresses("[::1]") == ["::1"]
    with pytest.raises(NoSuchDomain):
        resolver.addresses("nowhere.test")


def test_dns_server_answers_over_tcp(dns_server):
    import dns.message
    import dns.query

    host, port = dns_server.address
    answer = dns.query.tcp(dns.message.make_query("mx1.example.test", "A"), host, port=port, timeout=2)
    assert [rr.address for rr in answer.answer[0]] == ["127.0.0.2"]


def test_system_resolver_reads_hosts_file_for_localhost():
    assert "127.0.0.1" in Resolver(None).addresses("localhost")


@pytest.mark.parametrize("spec, expected", [
    ("mx.example.com", ("mx.example.com", 25)),
    ("mx.example.com:587", ("mx.example.com", 587)),
    ("[mx.example.com]", ("mx.example.com", 25)),
    ("[mx.example.com]:2525", ("mx.example.com", 2525)),
    ("10.0.0.1:26", ("10.0.0.1", 26)),
    ("[2001:db8::1]:587", ("2001:db8::1", 587)),
    ("2001:db8::1", ("2001:db8::1", 25)),
    ("mx.example.com.", ("mx.example.com", 25)),
])
def test_parse_host_forms(spec, expected):
    assert relay.parse_host(spec, 25) == expected


@pytest.mark.parametrize("spec", ["", "[::1", "[::1]x", "host:0", "host:99999", "host:no-such-service-x"])
def test_parse_host_rejects_bad_forms(spec):
    with pytest.raises(ValueError):
        relay.parse_host(spec, 25)


# -- TLS and AUTH -------------------------------------------------------------------------------------


def test_opportunistic_tls_accepts_untrusted_certificate(tmp_path, ca):
    with SmtpSink(tls_context=tls_server_context(ca, "localhost")) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
    assert statuses(results) == [OK]
    assert sink.messages[0].tls is True
    assert sink.messages[0].ehlo == "localhost"  # EHLO was repeated after STARTTLS


def test_opportunistic_tls_handshake_failure_retries_once_in_plain_text(tmp_path):
    with SmtpSink(broken_tls=True) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
    assert statuses(results) == [OK]
    assert sink.connections == 2
    assert sink.messages[0].tls is False


def test_tls_none_never_starts_tls(tmp_path, ca):
    with SmtpSink(tls_context=tls_server_context(ca, "localhost")) as sink:
        cfg = RelayConfig("smart", "smart", addresses=(hostport(sink),), tls="none")
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg)
    assert statuses(results) == [OK]
    assert sink.messages[0].tls is False


def test_required_tls_with_ca_file_delivers(tmp_path, ca, ca_file):
    with SmtpSink(tls_context=tls_server_context(ca, "127.0.0.1")) as sink:
        cfg = RelayConfig("smart", "smart", addresses=(hostport(sink),), tls="required", tls_ca_file=ca_file)
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg)
    assert statuses(results) == [OK]
    assert sink.messages[0].tls is True


def test_required_tls_verifies_host_name_from_dns(tmp_path, ca, ca_file, resolver):
    with SmtpSink(tls_context=tls_server_context(ca, "smart.example.test")) as sink:
        cfg = RelayConfig("smart", "smart.example.test", port=sink.port, tls="required", tls_ca_file=ca_file)
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg, resolver=resolver)
    assert statuses(results) == [OK]


def test_required_tls_without_trusted_ca_defers(tmp_path, ca):
    with SmtpSink(tls_context=tls_server_context(ca, "127.0.0.1")) as sink:
        cfg = RelayConfig("smart", "smart", addresses=(hostport(sink),), tls="required")
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg)
    assert statuses(results) == [TEMPFAIL]
    assert results[0].enhanced == "4.7.5"
    assert sink.transactions == []


def test_required_tls_with_wrong_host_name_defers(tmp_path, ca, ca_file):
    with SmtpSink(tls_context=tls_server_context(ca, "other.test")) as sink:
        cfg = RelayConfig("smart", "smart", addresses=(hostport(sink),), tls="required", tls_ca_file=ca_file)
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg)
    assert statuses(results) == [TEMPFAIL]
    assert sink.transactions == []


def test_required_tls_not_offered_defers(tmp_path, ca_file):
    with SmtpSink() as sink:
        cfg = RelayConfig("smart", "smart", addresses=(hostport(sink),), tls="required", tls_ca_file=ca_file)
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg)
    assert statuses(results) == [TEMPFAIL]
    assert "STARTTLS" in results[0].reply


def test_required_tls_failure_moves_to_next_host(tmp_path, ca, ca_file):
    with SmtpSink() as plain, SmtpSink(tls_context=tls_server_context(ca, "127.0.0.1")) as secure:
        cfg = RelayConfig("smart", "smart", addresses=(hostport(plain), hostport(secure)), tls="required",
                          tls_ca_file=ca_file)
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg)
    assert statuses(results) == [OK]
    assert secure.messages[0].tls is True


def auth_relay(tmp_path, sink, password="s3cret pw", **kw):
    pwfile = tmp_path / "password"
    pwfile.write_text(password + "\nignored second line\n")
    return RelayConfig("smart", "smart", addresses=(hostport(sink),), auth_user="joe",
                       auth_password_file=str(pwfile), **kw)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_over_tls_authenticates(tmp_path, ca, mechanism):
    with SmtpSink(tls_context=tls_server_context(ca, "localhost"), auth_users={"joe": "s3cret pw"},
                  auth_mechanisms=(mechanism,), require_auth=True) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=auth_relay(tmp_path, sink))
    assert statuses(results) == [OK]
    assert sink.auth_attempts == [(mechanism, "joe", True)]
    assert sink.messages[0].auth == "joe"


def test_auth_without_tls_defers_and_sends_no_credentials(tmp_path):
    with SmtpSink(auth_users={"joe": "s3cret pw"}, auth_requires_tls=False) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=auth_relay(tmp_path, sink))
    assert statuses(results) == [TEMPFAIL]
    assert "not sending credentials" in results[0].reply
    assert sink.auth_attempts == []
    assert not any(c.upper().startswith(("AUTH", "MAIL")) for c in sink.sessions[0].commands)


def test_auth_with_tls_none_defers(tmp_path, ca):
    with SmtpSink(tls_context=tls_server_context(ca, "localhost"), auth_users={"joe": "s3cret pw"},
                  auth_requires_tls=False) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=auth_relay(tmp_path, sink, tls="none"))
    assert statuses(results) == [TEMPFAIL]
    assert sink.auth_attempts == []


def test_auth_after_failed_opportunistic_handshake_defers_without_plain_retry(tmp_path):
    with SmtpSink(broken_tls=True, auth_users={"joe": "s3cret pw"}, auth_requires_tls=False) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=auth_relay(tmp_path, sink))
    assert statuses(results) == [TEMPFAIL]
    assert sink.connections == 1 and sink.auth_attempts == []


def test_rejected_credentials_defer_and_password_is_never_logged(tmp_path, ca, caplog):
    caplog.set_level(logging.DEBUG)
    with SmtpSink(tls_context=tls_server_context(ca, "localhost"), auth_users={"joe": "other"}) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=auth_relay(tmp_path, sink))
    assert statuses(results) == [TEMPFAIL]
    assert results[0].reply.startswith("535 5.7.8")
    assert sink.transactions == []
    assert "s3cret" not in caplog.text and "s3cret" not in results[0].reply


def test_missing_password_file_defers_without_connecting(tmp_path):
    with SmtpSink() as sink:
        cfg = RelayConfig("smart", "smart", addresses=(hostport(sink),), auth_user="joe",
                          auth_password_file=str(tmp_path / "missing"))
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg)
    assert statuses(results) == [TEMPFAIL]
    assert sink.connections == 0


# -- message text -------------------------------------------------------------------------------------


def test_lines_starting_with_a_dot_arrive_intact(tmp_path):
    body = b".first line\r\nSubject: x\r\n\r\n.\r\n..two dots\r\nmid . dot\r\n.\r\nend"
    with SmtpSink() as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"], body=body), hosts=(hostport(sink),))
    assert statuses(results) == [OK]
    assert sink.messages[0].data == body + b"\r\n"  # a missing final CRLF is added before the dot


def test_dot_stuffing_holds_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(relay, "CHUNK", 5)
    body = b"".join(b"%s.line %d\r\n" % (b"." * (i % 3), i) for i in range(50))
    with SmtpSink() as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"], body=body), hosts=(hostport(sink),))
    assert statuses(results) == [OK]
    assert sink.messages[0].data == body


def test_empty_body_is_sent_as_empty_message(tmp_path):
    with SmtpSink() as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"], body=b""), hosts=(hostport(sink),))
    assert statuses(results) == [OK]
    assert sink.messages[0].data == b""


def test_8_mib_message_is_streamed_not_loaded(tmp_path):
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (8 * 1024 * 1024 // len(line))
    digest = hashlib.sha256(body).hexdigest()
    delivery = make_delivery(tmp_path, ["a@x.test"], body=body)
    size = len(body)
    del body
    with SmtpSink(keep_data=False) as sink:
        tracemalloc.start()
        try:
            results = send(delivery, hosts=(hostport(sink),))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert statuses(results) == [OK]
    assert sink.messages[0].size == size and sink.messages[0].sha256 == digest
    assert peak < 2 * 1024 * 1024


# -- mail loops ---------------------------------------------------------------------------------------


def test_destination_that_is_our_listener_defers_as_mail_loop(tmp_path):
    with SmtpSink() as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),),
                       local_addresses=lambda: {("127.0.0.1", sink.port)})
    assert statuses(results) == [TEMPFAIL]
    assert "loops back to myself" in results[0].reply
    assert sink.connections == 0


def test_wildcard_listener_on_same_port_is_a_mail_loop(tmp_path, resolver):
    with SmtpSink() as sink:
        results = send(make_delivery(tmp_path, ["a@implicit.test"]), hosts=(), resolver=resolver,
                       mx_port=sink.port, local_addresses=lambda: {("0.0.0.0", sink.port)})
    assert statuses(results) == [TEMPFAIL]
    assert "loops back to myself" in results[0].reply
    assert sink.connections == 0


def test_listener_on_another_port_is_not_a_loop(tmp_path):
    with SmtpSink() as sink:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),),
                       local_addresses=lambda: {("0.0.0.0", sink.port + 1 if sink.port < 65535 else 1)})
    assert statuses(results) == [OK]


def test_deliver_needs_exactly_one_of_relay_and_hosts(tmp_path):
    with pytest.raises(ValueError):
        relay.deliver(make_delivery(tmp_path, ["a@x.test"]), None, None, NO_DNS)


# -- connection cache ---------------------------------------------------------------------------------

TXN = ["MAIL FROM:<S@SRC.TEST>", "RCPT TO:<A@X.TEST>", "DATA"]  # as lines() shows them


@pytest.fixture
def clock(monkeypatch):
    """A cache with a hand-driven clock: ``clock[0]`` is now."""
    now = [1000.0]
    monkeypatch.setattr(relay, "CACHE", relay.ConnectionCache(now=lambda: now[0]))
    yield now
    relay.CACHE.close_all()


def wait_for(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    for _ in range(int(timeout / 0.02) + 1):
        if predicate() or time.monotonic() > end:
            break
        time.sleep(0.02)
    return predicate()


def commands(session):
    return [c.split(" ", 1)[0].upper() for c in session.commands]


def lines(session):
    return [c.upper() for c in session.commands]


def test_two_deliveries_in_a_row_share_one_connection(tmp_path, fresh_cache):
    with SmtpSink() as sink:
        first = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        second = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        assert statuses(first + second) == [OK, OK]
        assert sink.connections == 1 and len(sink.messages) == 2
        # The RSET a parked session owes goes in one write with the next MAIL, RCPT and DATA.
        assert lines(sink.sessions[0]) == ["EHLO LOCALHOST"] + TXN + ["RSET"] + TXN
        assert len(fresh_cache) == 1


def test_replies_of_a_pipelined_group_share_one_receive_timeout(tmp_path, fresh_cache, monkeypatch):
    armed = []
    real = relay.set_kernel_timeout

    def counting(sock, option, seconds):
        if option == socket.SO_RCVTIMEO:
            armed.append(seconds)
        real(sock, option, seconds)

    monkeypatch.setattr(relay, "set_kernel_timeout", counting)
    with SmtpSink() as sink:
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        before = len(armed)
        results = send(make_delivery(tmp_path, ["a@x.test", "b@x.test"]), hosts=(hostport(sink),))
    assert statuses(results) == [OK, OK]
    # RSET, MAIL, two RCPT and DATA are answered under one timeout; the final dot under its own.
    group = max(FAST.command, FAST.data_init, FAST.rset)
    assert group != FAST.data_end and armed[before:] == [group, FAST.data_end]


def test_close_cached_quits_every_parked_session(tmp_path):
    with SmtpSink() as sink:
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        relay.close_cached()
        assert len(relay.CACHE) == 0
        assert wait_for(lambda: commands(sink.sessions[0])[-1:] == ["QUIT"])


def test_session_idle_longer_than_the_limit_is_quit_and_not_reused(tmp_path, clock):
    with SmtpSink() as sink:
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        clock[0] += relay.IDLE_SECONDS + 0.1
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        assert statuses(results) == [OK]
        assert sink.connections == 2
        assert wait_for(lambda: commands(sink.sessions[0])[-1:] == ["QUIT"])
        assert commands(sink.sessions[1]).count("MAIL") == 1


def test_reaper_quits_idle_sessions_without_another_delivery(tmp_path, monkeypatch):
    monkeypatch.setattr(relay, "CACHE", relay.ConnectionCache(idle=0.2))
    monkeypatch.setattr(relay, "REAP_SECONDS", 0.05)
    with SmtpSink() as sink:
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        assert wait_for(lambda: commands(sink.sessions[0])[-1:] == ["QUIT"])
        assert len(relay.CACHE) == 0


def test_session_dropped_by_the_server_while_idle_is_replaced_without_deferral(tmp_path, fresh_refused_memo):
    with SmtpSink(idle_timeout=0.2) as sink:
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        assert wait_for(lambda: sink.connections == 1 and sink.open_sessions == 0, timeout=3)
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        assert statuses(results) == [OK]
        assert sink.connections == 2 and len(sink.messages) == 2
        assert not fresh_refused_memo.skipped(*sink.address)


def _probes(monkeypatch):
    probed = []
    real = relay._looks_alive
    monkeypatch.setattr(relay, "_looks_alive", lambda client: probed.append(client) or real(client))
    return probed


def test_session_parked_a_moment_ago_is_reused_without_a_probe(tmp_path, clock, monkeypatch):
    probed = _probes(monkeypatch)
    with SmtpSink() as sink:
        for _ in range(2):
            assert statuses(send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))) == [OK]
        assert sink.connections == 1 and probed == []


def test_session_parked_longer_is_probed_before_reuse(tmp_path, clock, monkeypatch):
    probed = _probes(monkeypatch)
    with SmtpSink() as sink:
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        clock[0] += relay.PROBE_AFTER
        assert statuses(send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))) == [OK]
        assert sink.connections == 1 and len(probed) == 1


def test_hang_up_noticed_only_at_mail_connects_afresh_to_the_same_host(tmp_path, monkeypatch):
    monkeypatch.setattr(relay, "PROBE_IDLE", False)  # so the dead session really gets its MAIL
    with SmtpSink(timeout=0.3) as sink, SmtpSink() as backup:
        hosts = (hostport(sink), hostport(backup))
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=hosts)
        assert wait_for(lambda: sink.open_sessions == 0, timeout=3)  # the sink hung up, silently
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=hosts)
        assert statuses(results) == [OK]
        assert sink.connections == 2 and len(sink.messages) == 2
        assert backup.connections == 0


def test_421_to_mail_on_a_cached_session_connects_afresh_to_the_same_host(tmp_path, fresh_refused_memo):
    with SmtpSink(session_mail_limit=1) as sink, SmtpSink() as backup:
        hosts = (hostport(sink), hostport(backup))
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=hosts)
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=hosts)
        assert statuses(results) == [OK]
        assert sink.connections == 2 and len(sink.messages) == 2
        assert backup.connections == 0
        assert commands(sink.sessions[0])[-1] == "MAIL"


def test_421_to_mail_on_a_session_parked_after_a_size_refusal_connects_afresh(tmp_path, fresh_cache,
                                                                               fresh_refused_memo, monkeypatch):
    monkeypatch.setattr(relay, "PROBE_AFTER", 60.0)  # so the dead session really gets its MAIL
    with SmtpSink(pipelining=False, size_limit=200, idle_timeout=0.2) as sink:
        too_big = send(make_delivery(tmp_path, ["a@x.test"], body=BODY + b"x" * 300), hosts=(hostport(sink),))
        assert statuses(too_big) == [PERMFAIL]  # no MAIL was sent; the session was parked
        assert wait_for(lambda: sink.open_sessions == 0, timeout=3)  # 421 and hang-up while parked
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        assert statuses(results) == [OK]
        assert sink.connections == 2 and not fresh_refused_memo.skipped(*sink.address)


def test_421_to_mail_on_a_fresh_session_still_moves_to_the_next_host(tmp_path):
    with SmtpSink(mail_reply="421 4.3.2 going down") as first, SmtpSink() as second:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(first), hostport(second)))
        assert statuses(results) == [OK]
        assert first.connections == 1 and len(second.messages) == 1


def test_failed_rset_makes_a_parked_pipelining_session_stale(tmp_path, fresh_cache, fresh_refused_memo):
    with SmtpSink(rset_reply="500 5.5.1 RSET? never heard of it") as sink:
        for _ in range(2):
            assert statuses(send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))) == [OK]
        assert sink.connections == 2 and len(sink.messages) == 2
        first = commands(sink.sessions[0])
        assert first[:5] == ["EHLO", "MAIL", "RCPT", "DATA", "RSET"]
        assert "QUIT" not in first  # closed, not QUIT: a pipelined DATA may have been open
        assert not fresh_refused_memo.skipped(*sink.address)


def test_failed_rset_keeps_a_session_without_pipelining_out_of_the_cache(tmp_path, fresh_cache):
    with SmtpSink(pipelining=False, rset_reply="500 5.5.1 RSET? never heard of it") as sink:
        for _ in range(2):
            assert statuses(send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))) == [OK]
        assert sink.connections == 2
        assert commands(sink.sessions[0])[-2:] == ["RSET", "QUIT"]
        assert len(fresh_cache) == 0


def test_connection_serves_at_most_reuse_limit_transactions(tmp_path, monkeypatch):
    monkeypatch.setattr(relay, "CACHE", relay.ConnectionCache(reuse_limit=3))
    with SmtpSink() as sink:
        for _ in range(5):
            assert statuses(send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))) == [OK]
        assert sink.connections == 2
        assert commands(sink.sessions[0]).count("MAIL") == 3
        assert commands(sink.sessions[0])[-1] == "QUIT"  # no RSET spent on a session that cannot be parked
        relay.CACHE.close_all()


def test_connection_older_than_reuse_time_is_not_reused(tmp_path, clock):
    with SmtpSink() as sink:
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        clock[0] += 1.0
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        assert sink.connections == 1
        clock[0] += relay.REUSE_SECONDS - 1.0  # idle for 1 s only, but the connection is 300 s old
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        assert sink.connections == 2


def test_sessions_are_not_shared_between_auth_users(tmp_path, ca):
    def cfg(sink, user):
        pwfile = tmp_path / ("pw-" + user)
        pwfile.write_text("pw-%s\n" % user)
        return RelayConfig("smart", "smart", addresses=(hostport(sink),), auth_user=user,
                           auth_password_file=str(pwfile))

    with SmtpSink(tls_context=tls_server_context(ca, "localhost"),
                  auth_users={"joe": "pw-joe", "ann": "pw-ann"}) as sink:
        for user in ("joe", "ann", None, "joe", None, "ann"):
            delivery = make_delivery(tmp_path, ["a@x.test"])
            if user is None:
                results = send(delivery, hosts=(hostport(sink),))
            else:
                results = send(delivery, relay_cfg=cfg(sink, user))
            assert statuses(results) == [OK]
        assert sink.connections == 3
        assert [m.auth for m in sink.messages] == ["joe", "ann", None, "joe", None, "ann"]
        assert [s.auth for s in sink.sessions] == ["joe", "ann", None]
        assert sink.auth_attempts == [("PLAIN", "joe", True), ("PLAIN", "ann", True)]


def test_sessions_are_not_shared_between_tls_modes(tmp_path, ca, ca_file):
    with SmtpSink(tls_context=tls_server_context(ca, "127.0.0.1")) as sink:
        modes = {mode: RelayConfig("smart", "smart", addresses=(hostport(sink),), tls=mode, tls_ca_file=ca_file)
                 for mode in ("none", "opportunistic", "required")}
        for mode in ("none", "opportunistic", "required", "required", "opportunistic", "none"):
            assert statuses(send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=modes[mode])) == [OK]
        assert sink.connections == 3
        assert [s.tls for s in sink.sessions] == [False, True, True]
        assert [m.tls for m in sink.messages] == [False, True, True, True, True, False]
        assert [commands(s).count("MAIL") for s in sink.sessions] == [2, 2, 2]


def test_sessions_are_not_shared_between_helo_names(tmp_path):
    with SmtpSink() as sink:
        for name in ("one.src.test", "two.src.test", "one.src.test"):
            cfg = RelayConfig("smart", "smart", addresses=(hostport(sink),), helo_name=name)
            assert statuses(send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg)) == [OK]
        assert sink.connections == 2
        assert [m.ehlo for m in sink.messages] == ["one.src.test", "two.src.test", "one.src.test"]


def test_mail_loop_is_checked_before_a_cached_session_is_used(tmp_path):
    with SmtpSink() as sink:
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),),
                       local_addresses=lambda: {("127.0.0.1", sink.port)})
        assert statuses(results) == [TEMPFAIL]
        assert "loops back to myself" in results[0].reply
        assert lines(sink.sessions[0]) == ["EHLO LOCALHOST"] + TXN


def test_rejected_recipients_still_leave_a_reusable_session(tmp_path):
    with SmtpSink(rcpt_replies={"b@x.test": "550 5.1.1 no such user"}) as sink:
        first = send(make_delivery(tmp_path, ["b@x.test"]), hosts=(hostport(sink),))
        second = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        assert statuses(first + second) == [PERMFAIL, OK]
        assert sink.connections == 1


def test_concurrent_deliveries_never_use_one_session_at_once(tmp_path):
    threads_n, per_thread = 8, 5
    deliveries = [[make_delivery(tmp_path, ["a@x.test"]) for _ in range(per_thread)] for _ in range(threads_n)]
    results = []
    lock = threading.Lock()
    with SmtpSink() as sink:
        def worker(batch):
            for delivery in batch:
                out = send(delivery, hosts=(hostport(sink),))
                with lock:
                    results.extend(out)

        threads = [threading.Thread(target=worker, args=(b,)) for b in deliveries]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert statuses(results) == [OK] * (threads_n * per_thread)
        assert len(sink.messages) == threads_n * per_thread
        assert sink.connections <= threads_n  # a new session only while every other one is busy
        assert sink.connections < threads_n * per_thread
        # Two threads on one session would interleave their commands (or draw 503s).
        well_formed = re.compile(r"^EHLO MAIL RCPT DATA( RSET MAIL RCPT DATA)*( RSET)?( QUIT)?$")
        for session in sink.sessions:
            assert well_formed.match(" ".join(commands(session))), session.commands
        assert all(t.reply.startswith("250") for t in sink.transactions)


def test_cache_limits_idle_sessions_per_destination_and_in_all():
    cache = relay.ConnectionCache(per_destination=2, size=3)

    def key(ip, helo="h"):
        return (ip, 25, ip, helo, "none", None, 0.0, False, None)

    def parked():
        return relay._Parked(relay.smtplib.SMTP(), born=cache.now())  # never connected: nothing to QUIT

    assert cache.put(key("192.0.2.1"), parked())
    assert cache.put(key("192.0.2.1", helo="other"), parked())
    assert not cache.put(key("192.0.2.1"), parked())  # the destination has its two already
    assert cache.put(key("192.0.2.2"), parked())
    assert cache.put(key("192.0.2.3"), parked())  # full: the oldest session makes room
    assert len(cache) == 3
    assert cache.take(key("192.0.2.1")) is None
    assert cache.take(key("192.0.2.1", helo="other")) is not None
    cache.close_all()
    assert len(cache) == 0


DELIVER_SCRIPT = """
import os, sys, time
from pmaster.config import Config
from pmaster.dnsresolve import Resolver
from pmaster.envelope import Envelope, Recipient
from pmaster.mailers import Delivery, relay
body, host, fork = sys.argv[1], sys.argv[2], sys.argv[3] == "fork"

def deliver():
    rcpt = Recipient(address="a@x.test", original="a@x.test", mailer="relay", target="relay()")
    env = Envelope(queue_id="Q1", sender="s@src.test", recipients=[rcpt], arrival=time.time(), size=5,
                   body_type="7BIT")
    d = Delivery("Q1", env, [rcpt], body, Config(path="x"))
    print(relay.deliver(d, None, (host,), Resolver(("127.0.0.1", 9), timeout=1))[0].status, flush=True)

deliver()
if fork:
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # a normal exit: atexit handlers run in the child too
    os.waitpid(pid, 0)
    deliver()
"""


def run_deliver_script(tmp_path, sink, mode):
    body = tmp_path / "body"
    body.write_bytes(BODY + record_trailer(len(BODY), Envelope(queue_id="Q1", sender="s@src.test", recipients=[],
                                                                             arrival=0.0)))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(relay.__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run([sys.executable, "-c", DELIVER_SCRIPT, str(body), hostport(sink), mode], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)


def test_parked_session_does_not_keep_the_process_from_exiting_and_is_quit(tmp_path):
    with SmtpSink() as sink:
        proc = run_deliver_script(tmp_path, sink, "once")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [OK.encode()]
        assert wait_for(lambda: commands(sink.sessions[0])[-1:] == ["QUIT"])
        assert lines(sink.sessions[0]) == ["EHLO LOCALHOST"] + TXN + ["QUIT"]


def test_forked_child_never_quits_the_parents_parked_sessions(tmp_path):
    with SmtpSink() as sink:
        proc = run_deliver_script(tmp_path, sink, "fork")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [OK.encode()] * 2
        assert wait_for(lambda: commands(sink.sessions[0])[-1:] == ["QUIT"])
        assert sink.connections == 1
        assert lines(sink.sessions[0]) == ["EHLO LOCALHOST"] + TXN + ["RSET"] + TXN + ["QUIT"]


def test_message_end_does_not_wait_for_a_delayed_ack(tmp_path):
    # With the final dot as a write of its own (and Nagle on), each message waited ~40 ms for the
    # server's delayed ACK before the dot left; 20 messages on one cached session take milliseconds.
    with SmtpSink() as sink:
        send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))
        start = time.monotonic()
        for _ in range(20):
            assert statuses(send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(sink),))) == [OK]
        elapsed = time.monotonic() - start
        assert sink.connections == 1
        assert elapsed < 0.5


# -- PIPELINING (RFC 2920) ------------------------------------------------------------------------------


class _BatchOnlyServer:
    """Answers nothing after EHLO until MAIL, every RCPT and DATA have arrived: only a pipelining client
    gets through. Then answers them in order (``rcpt_codes`` per RCPT), takes the text and says 250."""

    def __init__(self, rcpt_codes):
        self.rcpt_codes = rcpt_codes
        self.batch = b""
        self.text = b""
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        conn.settimeout(5)
        with conn:
            buf = b""

            def until(marker):
                nonlocal buf
                while marker not in buf:
                    data = conn.recv(65536)
                    if not data:
                        raise OSError("closed")
                    buf += data
                head, _, buf = buf.partition(marker)
                return head + marker

            conn.sendall(b"220 batch.test ESMTP\r\n")
            until(b"\r\n")  # EHLO
            conn.sendall(b"250-batch.test\r\n250 PIPELINING\r\n")
            self.batch = until(b"DATA\r\n")  # a client waiting for the MAIL reply never gets here
            replies = [b"250 2.1.0 ok"] + [b"%d x" % c for c in self.rcpt_codes] + [b"354 go on"]
            conn.sendall(b"".join(r + b"\r\n" for r in replies))
            self.text = until(b"\r\n.\r\n")
            conn.sendall(b"250 2.0.0 queued\r\n")
            until(b"\r\n")  # RSET or QUIT
            conn.sendall(b"221 2.0.0 bye\r\n")

    def close(self):
        self.thread.join(10)
        self.listener.close()


def test_mail_rcpt_and_data_go_in_one_batch_to_a_pipelining_server(tmp_path):
    server = _BatchOnlyServer([250, 550])
    try:
        results = send(make_delivery(tmp_path, ["a@x.test", "b@x.test"]), hosts=("127.0.0.1:%d" % server.port,))
    finally:
        server.close()
    assert statuses(results) == [OK, PERMFAIL]
    assert results[1].reply == "550 x"
    assert server.batch.split(b"\r\n")[:4] == [b"MAIL FROM:<s@src.test>", b"RCPT TO:<a@x.test>",
                                               b"RCPT TO:<b@x.test>", b"DATA"]
    assert server.text.endswith(BODY.split(b"\r\n")[-2] + b"\r\n.\r\n")


def test_pipelined_transaction_with_every_recipient_refused_sends_no_text(tmp_path):
    with SmtpSink(rcpt_replies={"a@x.test": "550 5.1.1 no", "b@x.test": "450 4.2.1 later"}) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test", "b@x.test"]), hosts=(hostport(sink),))
        assert statuses(results) == [PERMFAIL, TEMPFAIL]
        assert sink.transactions == []
        commands = [c.split(":")[0].split()[0].upper() for c in sink.sessions[0].commands]
    assert commands[:5] == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"]


def test_server_without_pipelining_gets_one_command_at_a_time(tmp_path):
    with SmtpSink(pipelining=False, rcpt_replies={"b@x.test": "550 5.1.1 no"}) as sink:
        results = send(make_delivery(tmp_path, ["a@x.test", "b@x.test"]), hosts=(hostport(sink),))
        assert statuses(results) == [OK, PERMFAIL]
        assert sink.messages[0].rcpts == ["a@x.test"]


def test_pipelined_mail_refusal_is_a_session_failure_and_the_next_host_is_tried(tmp_path):
    with SmtpSink(mail_reply="451 4.3.0 not now") as first, SmtpSink() as second:
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=(hostport(first), hostport(second)))
    assert statuses(results) == [OK]
    assert first.messages == [] and len(second.messages) == 1


# -- timeouts: kernel timeouts on plain sockets, Python timeouts once TLS is on --------------------------

SHORT = relay.Timeouts(connect=2, command=0.5, data_init=0.5, data_block=0.5, data_end=0.5, quit=0.5)


class _SilentAfter:
    """A server that follows a script of (expected line prefix, reply) and then reads and never answers."""

    def __init__(self, script):
        self.script = script
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(5)
        self.address = self.listener.getsockname()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(10)
            f = conn.makefile("rb")
            conn.sendall(b"220 silent.test ESMTP\r\n")
            for prefix, reply in self.script:
                line = f.readline()
                assert line.upper().startswith(prefix), line
                conn.sendall(reply)
            self.done.wait(10)  # reads nothing more, answers nothing more

    def close(self):
        self.done.set()
        self.thread.join(5)
        self.listener.close()


def test_a_server_silent_after_mail_data_defers_as_timed_out(tmp_path):
    server = _SilentAfter([(b"EHLO", b"250 silent.test\r\n")])
    try:
        started = time.monotonic()
        results = send(make_delivery(tmp_path, ["a@x.test"]), hosts=("127.0.0.1:%d" % server.address[1],),
                       timeouts=SHORT)
    finally:
        server.close()
    assert statuses(results) == [TEMPFAIL]
    assert "timed out" in results[0].reply
    assert time.monotonic() - started < 5


def test_a_server_silent_in_the_tls_handshake_defers_in_time(tmp_path, ca_file):
    server = _SilentAfter([(b"EHLO", b"250-silent.test\r\n250 STARTTLS\r\n"), (b"STARTTLS", b"220 2.0.0 go\r\n")])
    try:
        cfg = RelayConfig("smart", "smart", addresses=("127.0.0.1:%d" % server.address[1],), tls="required",
                          tls_ca_file=ca_file)
        started = time.monotonic()
        results = send(make_delivery(tmp_path, ["a@x.test"]), relay_cfg=cfg, timeouts=SHORT)
    finally:
        server.close()
    assert statuses(results) == [TEMPFAIL]
    assert time.monotonic() - started < 5
