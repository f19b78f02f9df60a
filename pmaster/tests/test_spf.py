"""SPF (pmaster/policy/spf.py): pyspf against a DNS server on loopback, each result, the replies, the headers."""

import threading
import time
from types import SimpleNamespace

import pytest

from pmaster.policy import spf as spfmod
from pmaster.policy.authres import authserv_id, fold, strip_ours
from pmaster.policy.chain import Outcome
from pmaster.policy.spf import SpfCheck
from pmaster.tests.dnsserver import DnsServer

RECORDS = {
    "pass.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
    "fail.test": {"TXT": ["v=spf1 -all exp=why.fail.test"]},
    "why.fail.test": {"TXT": ["%{i} is not one of our servers"]},
    "soft.test": {"TXT": ["v=spf1 ~all"]},
    "neutral.test": {"TXT": ["v=spf1 ?all"]},
    "perm.test": {"TXT": ["v=spf1 frobnicate -all"]},
    "none.test": {"A": ["127.0.0.9"]},
    "split.test": {"TXT": [["v=spf1 ip4:127.0.0.5", " -all"]]},
    "helo.test": {"TXT": ["v=spf1 a -all"], "A": ["127.0.0.7"]},
    "v6.test": {"TXT": ["v=spf1 ip6:::1 -all"]},
}


@pytest.fixture(scope="module")
def dns():
    with DnsServer(RECORDS, zones=("test",), timeout_names=("slow.test",), servfail_names=("broken.test",)) as d:
        yield d


def view(mail_from, ip="127.0.0.5", helo="client.test"):
    return SimpleNamespace(listener="mx", client_address=ip, client_port=40000, client_name="unknown", helo=helo,
                           tls=None, mail_from=mail_from, recipients=(), recipient=None, size=0)


def checker(dns, mode="reject", lifetime=3.0):
    return SpfCheck(mode, "mx.test", dns.address, lifetime=lifetime)


@pytest.mark.parametrize("sender,result", [
    ("a@pass.test", "pass"), ("a@fail.test", "fail"), ("a@soft.test", "softfail"), ("a@neutral.test", "neutral"),
    ("a@perm.test", "permerror"), ("a@none.test", "none"), ("a@nowhere.test", "none"), ("a@split.test", "pass"),
    ("a@broken.test", "temperror"),
])
def test_each_spf_result_comes_from_the_configured_dns(dns, sender, result):
    assert checker(dns).evaluate("127.0.0.5", sender, "client.test").result == result


def test_null_sender_is_checked_with_the_helo_identity(dns):
    res = checker(dns).evaluate("127.0.0.7", "", "helo.test")
    assert (res.result, res.identity) == ("pass", "helo")
    assert checker(dns).evaluate("127.0.0.8", "", "helo.test").result == "fail"
    assert "smtp.helo=helo.test" in res.authentication_results


def test_null_sender_with_an_address_literal_helo_is_none_without_a_lookup(dns):
    before = len(dns.queries)
    assert checker(dns).evaluate("127.0.0.7", "", "[127.0.0.7]").result == "none"
    assert len(dns.queries) == before


def test_ipv6_client_is_matched_by_ip6_mechanism(dns):
    assert checker(dns).evaluate("::1", "a@v6.test", "client.test").result == "pass"


def test_dns_timeout_is_temperror_within_the_lifetime(dns):
    started = time.monotonic()
    res = checker(dns, lifetime=1.5).evaluate("127.0.0.5", "a@slow.test", "client.test")
    assert res.result == "temperror"
    assert time.monotonic() - started < 6


def test_reject_mode_refuses_fail_with_550_5_7_23_and_the_domains_explanation(dns):
    reply = checker(dns).check("mail", view("a@fail.test"), Outcome())
    assert (reply.code, reply.enhanced) == (550, "5.7.23")
    assert "127.0.0.5 is not one of our servers" in reply.text


def test_reject_mode_defers_temperror_with_451_4_7_24(dns):
    reply = checker(dns, lifetime=1.0).check("mail", view("a@slow.test"), Outcome())
    assert (reply.code, reply.enhanced) == (451, "4.7.24")


@pytest.mark.parametrize("sender", ["a@pass.test", "a@soft.test", "a@neutral.test", "a@perm.test", "a@none.test"])
def test_reject_mode_accepts_and_tags_every_other_result(dns, sender):
    outcome = Outcome()
    assert checker(dns).check("mail", view(sender), outcome) is None
    assert [h.split(":", 1)[0] for h in outcome.prepend] == ["Received-SPF", "Authentication-Results"]


@pytest.mark.parametrize("sender,result", [("a@fail.test", "fail"), ("a@slow.test", "temperror")])
def test_tag_mode_never_refuses_and_tags_the_result(dns, sender, result):
    outcome = Outcome()
    assert checker(dns, mode="tag", lifetime=1.0).check("mail", view(sender), outcome) is None
    assert outcome.prepend[1].startswith("Authentication-Results: mx.test; spf=%s " % result)


def test_received_spf_header_names_result_client_and_identity(dns):
    res = checker(dns).evaluate("127.0.0.5", "a@pass.test", "client.test")
    unfolded = res.received_spf.replace("\r\n\t", " ")
    assert unfolded.startswith("Received-SPF: Pass (mx.test: ")
    for part in ("client-ip=127.0.0.5;", 'envelope-from="a@pass.test";', "helo=client.test;", "receiver=mx.test;",
                 "identity=mailfrom"):
        assert part in unfolded
    assert all(len(line) <= 78 for line in res.received_spf.split("\r\n"))


def test_authentication_results_carries_our_authserv_id_and_the_mailfrom_domain(dns):
    res = checker(dns).evaluate("127.0.0.5", "a@pass.test", "client.test")
    assert res.authentication_results == "Authentication-Results: mx.test; spf=pass smtp.mailfrom=pass.test"


def test_lookups_of_other_threads_keep_using_pyspfs_own_resolver(dns, monkeypatch):
    # The dispatcher uses the configured server only inside an evaluation of the calling thread.
    seen = []
    monkeypatch.setattr(spfmod, "_pyspf_lookup", lambda name, qtype, strict=True, timeout=30: seen.append(name) or [])
    t = threading.Thread(target=lambda: spfmod._dispatch_lookup("other.example", "TXT"))
    t.start()
    t.join(10)
    assert seen == ["other.example"]
    monkeypatch.undo()
    assert checker(dns).evaluate("127.0.0.5", "a@pass.test", "client.test").result == "pass"


def test_strip_ours_removes_only_fields_with_our_authserv_id_and_their_continuations():
    head = (b"Subject: x\r\nAuthentication-Results: MX.test.; spf=pass\r\n\tsmtp.mailfrom=evil.test\r\n"
            b"Authentication-Results: (comment) mx.test; dkim=pass\r\n"
            b"Authentication-Results: upstream.test; spf=fail\r\nTo: y\r\n")
    assert strip_ours(head, "mx.test") == (b"Subject: x\r\nAuthentication-Results: upstream.test; spf=fail\r\n"
                                           b"To: y\r\n")


def test_authserv_id_parses_quoted_and_commented_forms():
    assert authserv_id(' "mx.test" ; spf=pass') == "mx.test"
    assert authserv_id(" (a (nested) comment) Mx.Test; none") == "mx.test"
    assert authserv_id(" (unclosed") == ""


def test_fold_keeps_lines_short_and_words_whole():
    text = fold("X-Long", " ".join(["word%d" % i for i in range(40)]))
    lines = text.split("\r\n")
    assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
    assert text.replace("\r\n\t", " ") == "X-Long: " + " ".join(["word%d" % i for i in range(40)])


def test_dns_cache_answers_repeated_evaluations_until_the_ttl_runs_out(dns):
    clock = [0.0]
    check = SpfCheck("reject", "mx.test", dns.address, lifetime=3.0, cache=spfmod.DnsCache(now=lambda: clock[0]))
    asked = lambda: sum(1 for q in dns.queries if q == ("pass.test", "TXT"))  # noqa: E731
    before = asked()
    for _ in range(3):
        assert check.evaluate("127.0.0.5", "a@pass.test", "client.test").result == "pass"
    assert asked() == before + 1
    clock[0] += 61  # the test server's TTL is 60
    assert check.evaluate("127.0.0.5", "a@pass.test", "client.test").result == "pass"
    assert asked() == before + 2


def test_dns_cache_never_keeps_a_timeout(dns):
    cache = spfmod.DnsCache()
    check = SpfCheck("reject", "mx.test", dns.address, lifetime=1.0, cache=cache)
    assert check.evaluate("127.0.0.5", "a@slow.test", "client.test").result == "temperror"
    assert len(cache) == 0
