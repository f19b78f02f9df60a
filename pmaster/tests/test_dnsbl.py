"""DNS blocklists (pmaster/policy/dnsbl.py) against a DNS server on loopback: names, listings, cache, failures."""

import time
from types import SimpleNamespace

import pytest

from pmaster.config import address_in
from pmaster.policy.chain import Outcome
from pmaster.policy.dnsbl import DnsblCache, DnsblCheck, Listing, reversed_name
from pmaster.tests.dnsserver import DnsServer

RECORDS = {
    "2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["Listed; see https://bl.test/q?127.0.0.2"]},
    "3.0.0.127.bl.test": {"A": ["127.0.0.4"]},  # listed, no TXT text
    "4.0.0.127.bl.test": {"A": ["127.255.255.254"]},  # the list's "query refused" code
    "5.0.0.127.bl.test": {"A": ["10.0.0.1"]},  # a wildcarding zone: not a listing
    "2.0.0.127.other.test": {"A": ["127.0.0.10"], "TXT": [["first ", "second"]]},
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.bl.test": {"A": ["127.0.0.2"]},
}


@pytest.fixture(scope="module")
def dns():
    with DnsServer(RECORDS, zones=("bl.test", "other.test"), timeout_names=("2.0.0.127.slow.test",),
                   servfail_names=("2.0.0.127.broken.test",)) as d:
        yield d


def view(ip):
    return SimpleNamespace(listener="mx", client_address=ip, client_port=40000, client_name="unknown",
                           helo="client.test", tls=None, mail_from="a@b.test", recipients=(),
                           recipient="rcpt@example.org", size=0)


def checker(dns, zones=("bl.test",), trusted=("127.0.0.1/32", "::1/128"), cache=None, lifetime=2.0):
    return DnsblCheck(zones, lambda ip: address_in(ip, trusted), cache if cache is not None else DnsblCache(), dns.address,
                      lifetime=lifetime)


def test_reversed_name_of_ipv4_reverses_the_octets():
    assert reversed_name("192.0.2.99", "zen.example.") == "99.2.0.192.zen.example"


def test_reversed_name_of_ipv6_reverses_the_nibbles():
    assert reversed_name("2001:db8::1", "bl.test") == (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test")


def test_reversed_name_of_ipv4_mapped_ipv6_uses_the_ipv4_form():
    assert reversed_name("::ffff:192.0.2.99", "bl.test") == "99.2.0.192.bl.test"


def test_listed_client_is_refused_with_554_5_7_1_and_the_txt_text(dns):
    reply = checker(dns).check("rcpt", view("127.0.0.2"), Outcome())
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    assert reply.text == ("Service unavailable; client [127.0.0.2] blocked using bl.test; "
                          "Listed; see https://bl.test/q?127.0.0.2")


def test_listed_client_without_txt_gets_the_reply_without_text(dns):
    reply = checker(dns).check("rcpt", view("127.0.0.3"), Outcome())
    assert reply.text == "Service unavailable; client [127.0.0.3] blocked using bl.test"


def test_txt_record_of_several_strings_is_joined(dns):
    reply = checker(dns, zones=("other.test",)).check("rcpt", view("127.0.0.2"), Outcome())
    assert reply.text.endswith("blocked using other.test; first second")


def test_unlisted_client_nxdomain_is_accepted(dns):
    assert checker(dns).check("rcpt", view("127.0.0.77"), Outcome()) is None


def test_error_code_answer_in_127_255_255_is_not_a_listing(dns):
    assert checker(dns).check("rcpt", view("127.0.0.4"), Outcome()) is None


def test_answer_outside_127_8_is_not_a_listing(dns):
    assert checker(dns).check("rcpt", view("127.0.0.5"), Outcome()) is None


def test_ipv6_client_is_looked_up_by_nibbles(dns):
    reply = checker(dns, trusted=()).check("rcpt", view("::1"), Outcome())
    assert reply is not None and "client [::1] blocked using bl.test" in reply.text


def test_trusted_client_is_never_looked_up(dns):
    before = len(dns.queries)
    assert checker(dns, trusted=("127.0.0.0/29",)).check("rcpt", view("127.0.0.2"), Outcome()) is None
    assert len(dns.queries) == before


def test_first_listing_zone_answers_in_configured_order(dns):
    reply = checker(dns, zones=("other.test", "bl.test")).check("rcpt", view("127.0.0.2"), Outcome())
    assert "blocked using other.test" in reply.text


def test_dns_timeout_counts_as_not_listed_and_is_logged(dns, caplog):
    started = time.monotonic()
    assert checker(dns, zones=("slow.test",), lifetime=1.0).check("rcpt", view("127.0.0.2"), Outcome()) is None
    assert time.monotonic() - started < 6
    assert "look-up of [127.0.0.2] in slow.test failed" in caplog.text


def test_servfail_counts_as_not_listed_and_the_next_zone_is_asked(dns):
    reply = checker(dns, zones=("broken.test", "bl.test")).check("rcpt", view("127.0.0.2"), Outcome())
    assert "blocked using bl.test" in reply.text


def test_answers_are_cached_until_their_ttl_runs_out(dns):
    clock = [1000.0]
    cache = DnsblCache(now=lambda: clock[0])
    check = checker(dns, cache=cache)
    name = "2.0.0.127.bl.test"
    count = lambda: sum(1 for q in dns.queries if q == (name, "A"))  # noqa: E731
    before = count()
    check.check("rcpt", view("127.0.0.2"), Outcome())
    check.check("rcpt", view("127.0.0.2"), Outcome())
    assert count() == before + 1
    clock[0] += 61  # the test server's TTL is 60
    check.check("rcpt", view("127.0.0.2"), Outcome())
    assert count() == before + 2


def test_failed_lookups_are_not_cached(dns):
    cache = DnsblCache()
    checker(dns, zones=("slow.test",), cache=cache, lifetime=0.5).check("rcpt", view("127.0.0.2"), Outcome())
    assert len(cache) == 0


def test_cache_is_bounded_and_drops_the_least_recently_used():
    cache = DnsblCache(size=2)
    cache.put("z", "1", Listing(False))
    cache.put("z", "2", Listing(False))
    assert cache.get("z", "1") is not None
    cache.put("z", "3", Listing(True))
    assert (cache.get("z", "1") is not None, cache.get("z", "2"), len(cache)) == (True, None, 2)
