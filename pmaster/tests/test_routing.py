"""Tests for the routing engine (SPEC sections 3 and 9): table-driven ``address -> targets`` rows.

A row's expectation is a list of ``recipient mailer:target`` strings (``target`` as the envelope stores
it: a section name or the literal ``relay(...)``/``pipe(...)``), or a reply code such as ``"550 5.1.1"``.
"""

import os

import pytest

from pmaster.config import load
from pmaster.errors import RouteError
from pmaster.routing import MAX_DEPTH, Router, static_check

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "postmaster.cf.example")


def router(tmp_path, text, is_local_user=lambda name: name == "alice"):
    path = tmp_path / "p.cf"
    path.write_text(text)
    return Router(load(str(path)), is_local_user=is_local_user)


def outcome(r, address, table=None, local_rcpt_to=False):
    try:
        targets = r.resolve(address, table, local_rcpt_to=local_rcpt_to)
    except RouteError as exc:
        return "%d %s" % (exc.reply.code, exc.reply.enhanced)
    return ["%s %s:%s" % (t.address, t.mailer, t.target) for t in targets]


# The design note's virtusertable block, verbatim, plus the keys its targets need so that each row shows one
# rule (jane.dow@example.org, joe.doe@example.net, propaganda@example.net). joe@example.net has no route.
VIRTUSERTABLE = """\
[core]
hostname = mail.example.org
[route]
// deliver to local mailbox using the default local mailer
joe.doe@example.org         joe

// rewrite recipient address
joe.dow@example.org         jane.dow@example.org

// if any target address fails, the entire RCPT TO fails
dow.joe@example.org         joe@example.net, joe@example.com

// define domain name aliases
@example.com                @example.net

// exact matches take precedence over the default match above
joe@example.com             joe.doe@example.com

// do what sendmail does for members of /etc/passwd
info@                       propaganda@example.net

jane.dow@example.org        jane
joe.doe@example.net         joe
propaganda@example.net      pipe(/usr/bin/cat >/dev/null)
"""


@pytest.mark.parametrize("address, expected", [
    ("joe.doe@example.org", ["joe pipe:procmail"]),
    ("joe.dow@example.org", ["jane pipe:procmail"]),
    ("dow.joe@example.org", "550 5.1.1"),
    ("joe.doe@example.com", ["joe pipe:procmail"]),
    ("nobody@example.com", "550 5.1.1"),
    ("joe@example.com", ["joe pipe:procmail"]),
    ("info@mail.example.org", ["propaganda@example.net pipe:pipe(/usr/bin/cat >/dev/null)"]),
    ("info@localhost", ["propaganda@example.net pipe:pipe(/usr/bin/cat >/dev/null)"]),
    ("info@example.net", "550 5.1.1"),
])
def test_design_note_virtusertable(tmp_path, address, expected):
    assert outcome(router(tmp_path, VIRTUSERTABLE), address) == expected


# The design note's mailer-call block, verbatim.
MAILER_CALLS = """\
// configure relaying
@acme.example.com           relay(10.0.0.1:587)

// configure several smart hosts (in order of preference)
@                           relay(isp.example.net, 10.33.0.1)

// we don't need no "..."-quoting of the argument
abuse@acme.example.com      pipe(/usr/bin/cat >/dev/null)
"""


@pytest.mark.parametrize("address, expected", [
    ("sales@acme.example.com", ["sales@acme.example.com relay:relay(10.0.0.1:587)"]),
    ("someone@elsewhere.example", ["someone@elsewhere.example relay:relay(isp.example.net, 10.33.0.1)"]),
    ("abuse@acme.example.com", ["abuse@acme.example.com pipe:pipe(/usr/bin/cat >/dev/null)"]),
])
def test_design_note_mailer_calls(tmp_path, address, expected):
    assert outcome(router(tmp_path, MAILER_CALLS), address) == expected


def test_relay_call_hosts_in_order(tmp_path):
    [t] = router(tmp_path, MAILER_CALLS).resolve("x@elsewhere.example")
    assert (t.hosts, t.name) == (("isp.example.net", "10.33.0.1"), None)


def test_relay_call_with_port(tmp_path):
    [t] = router(tmp_path, MAILER_CALLS).resolve("x@acme.example.com")
    assert t.hosts == ("10.0.0.1:587",)


def test_pipe_call_keeps_command_line(tmp_path):
    [t] = router(tmp_path, MAILER_CALLS).resolve("abuse@acme.example.com")
    assert (t.command, t.name, t.argv) == ("/usr/bin/cat >/dev/null", None, ())


# -- precedence and keys

RULES = """\
[core]
hostname = mail.example.org
recipient-delimiter = +
[smtpd mx]
name = mx.example.net
listen-port = 127.0.0.1:2525
[pipe lmtp]
exec = /usr/bin/deliver -d ${RCPT_TO} -e ${EXTENSION}
[relay hub]
name = hub.example.net
address = 10.0.0.1:2525
address = 10.0.0.2
[route]
joe@example.org           joe
info@                     helpdesk
news@                     lmtp
@example.org              @example.net
jane@example.net          jane
@example.net              relay()
webmaster@example.org     hub
hub-user@example.org      smart.example.net
ops@example.org           ops-team
ops-team                  alice, bob@example.net
bob@example.net           bob
"""


@pytest.mark.parametrize("address, expected", [
    ("joe@example.org", ["joe pipe:procmail"]),                        # exact key
    ("joe+news@example.org", ["joe pipe:procmail"]),                   # delimiter falls back to joe@
    ("Joe@Example.ORG", ["joe pipe:procmail"]),                        # keys are case-insensitive
    ("joe@example.org.", ["joe pipe:procmail"]),                       # trailing dot in the domain
    ("info@mail.example.org", ["helpdesk pipe:procmail"]),                # local@ for the hostname
    ("info@localhost", ["helpdesk pipe:procmail"]),                       # local@ for localhost
    ("info@mx.example.net", ["helpdesk pipe:procmail"]),                  # local@ for an [smtpd] name
    ("info+x@localhost", ["helpdesk pipe:procmail"]),                     # delimiter also for local@
    ("info@example.net", ["info@example.net relay:relay()"]),          # local@ not for foreign domains
    ("jane@example.org", ["jane pipe:procmail"]),                      # domain alias keeps the local part
    ("nobody@example.org", ["nobody@example.net relay:relay()"]),      # @domain
    ("nobody@example.com", "550 5.1.1"),                               # no route
    ("news@localhost", ["news@localhost pipe:lmtp"]),                  # [pipe] section name
    ("webmaster@example.org", ["webmaster@example.org relay:hub"]),    # [relay] section name
    ("hub-user@example.org", ["hub-user@example.org relay:relay(smart.example.net)"]),  # dotted bare word
    ("ops@example.org", ["alice pipe:procmail", "bob pipe:procmail"]),  # bare word key, several targets
])
def test_routing_rules(tmp_path, address, expected):
    assert outcome(router(tmp_path, RULES), address) == expected


def test_recipient_delimiter_extension_is_kept(tmp_path):
    [t] = router(tmp_path, RULES).resolve("joe+news@example.org")
    assert (t.extension, t.original) == ("news", "joe+news@example.org")


def test_recipient_delimiter_extension_for_local_key(tmp_path):
    [t] = router(tmp_path, RULES).resolve("news+lists@localhost")
    assert (t.target, t.extension, t.argv) == ("lmtp", "lists", ("/usr/bin/deliver", "-d", "news+lists@localhost",
                                                                  "-e", "lists"))


def test_exact_key_with_extension_wins_over_base(tmp_path):
    r = router(tmp_path, "[core]\nrecipient-delimiter = +\n[route]\njoe+news@x.org news\njoe@x.org joe\n")
    assert outcome(r, "joe+news@x.org") == ["news pipe:procmail"]


def test_without_delimiter_plus_is_part_of_the_name(tmp_path):
    r = router(tmp_path, "joe@x.org joe\n")
    assert outcome(r, "joe+news@x.org") == "550 5.1.1"


def test_relay_section_hosts(tmp_path):
    [t] = router(tmp_path, RULES).resolve("webmaster@example.org")
    assert (t.name, t.hosts) == ("hub", ("10.0.0.1:2525", "10.0.0.2"))


def test_relay_section_without_address_uses_name(tmp_path):
    r = router(tmp_path, "[relay hub]\nname = hub.example.net\n[route]\n@ hub\n")
    assert r.resolve("x@y.org")[0].hosts == ("hub.example.net",)


def test_empty_relay_call_means_mx(tmp_path):
    [t] = router(tmp_path, RULES).resolve("x@example.net")
    assert (t.mailer, t.hosts) == ("relay", ())


def test_pipe_section_argv_is_expanded_per_recipient(tmp_path):
    [t] = router(tmp_path, RULES).resolve("news@localhost")
    assert t.argv == ("/usr/bin/deliver", "-d", "news@localhost", "-e", "")


def test_catch_all_relays_everything(tmp_path):
    r = router(tmp_path, "@ relay(smart.example.net:587)\n")
    assert outcome(r, "anyone@anywhere.example") == ["anyone@anywhere.example relay:relay(smart.example.net:587)"]


def test_at_domain_wins_over_catch_all(tmp_path):
    r = router(tmp_path, "@ relay(a.example)\n@x.org relay(b.example)\n")
    assert outcome(r, "u@x.org") == ["u@x.org relay:relay(b.example)"]


def test_local_key_wins_over_at_domain(tmp_path):
    r = router(tmp_path, "[core]\nhostname = x.org\n[route]\n@x.org relay(b.example)\nu@ joe\n")
    assert outcome(r, "u@x.org") == ["joe pipe:procmail"]


def test_local_domains_setting_replaces_default(tmp_path):
    r = router(tmp_path, "[core]\nhostname = mail.example.org\nlocal-domains = example.org\n[route]\ninfo@ joe\n")
    assert (outcome(r, "info@example.org"), outcome(r, "info@localhost"), outcome(r, "info@mail.example.org")) == \
        (["joe pipe:procmail"], "550 5.1.1", "550 5.1.1")


def test_address_rewrite_resolves_again(tmp_path):
    r = router(tmp_path, "a@x.org b@y.org\nb@y.org relay(h.example)\n")
    assert outcome(r, "a@x.org") == ["b@y.org relay:relay(h.example)"]


def test_address_rewrite_keeps_original(tmp_path):
    r = router(tmp_path, "a@x.org b@y.org\nb@y.org relay(h.example)\n")
    assert r.resolve("a@x.org")[0].original == "a@x.org"


def test_any_failing_target_fails_whole_address(tmp_path):
    r = router(tmp_path, "list@x.org joe, nowhere@y.org\n")
    assert outcome(r, "list@x.org") == "550 5.1.1"


def test_no_route_reply_names_the_original_address(tmp_path):
    r = router(tmp_path, "list@x.org a@y.org\n")
    with pytest.raises(RouteError) as info:
        r.resolve("list@x.org")
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.1.1") and "list@x.org" in str(info.value)


def test_duplicate_final_targets_are_merged(tmp_path):
    r = router(tmp_path, "list@x.org joe, joe\n")
    assert outcome(r, "list@x.org") == ["joe pipe:procmail"]


# -- named tables


NAMED = """\
postmaster    joe
@             relay(smart.example.net)
shared@x.org  jane
[route "extern"]
@x.org        relay(mx.x.org)
shared@x.org  jim
"""


def test_named_table_key_wins(tmp_path):
    assert outcome(router(tmp_path, NAMED), "shared@x.org", "extern") == ["jim pipe:procmail"]


def test_named_table_falls_back_per_key_to_unnamed(tmp_path):
    assert outcome(router(tmp_path, NAMED), "postmaster", "extern") == ["joe pipe:procmail"]


def test_named_table_falls_back_for_catch_all(tmp_path):
    assert outcome(router(tmp_path, NAMED), "u@y.org", "extern") == ["u@y.org relay:relay(smart.example.net)"]


def test_unnamed_table_does_not_see_named_keys(tmp_path):
    assert outcome(router(tmp_path, NAMED), "u@x.org") == ["u@x.org relay:relay(smart.example.net)"]


# -- bare names, local users, postmaster


def test_bare_word_is_local_user_via_local_mailer(tmp_path):
    [t] = router(tmp_path, "a@x.org joe\n").resolve("a@x.org")
    assert (t.address, t.mailer, t.name, t.argv) == \
        ("joe", "pipe", "procmail", ("/usr/bin/procmail", "-f", "${MAIL_FROM}", "-d", "joe"))


def test_local_mailer_naming_a_relay(tmp_path):
    r = router(tmp_path, "[core]\nlocal-mailer = hub\n[relay hub]\naddress 10.0.0.9\n[route]\na@x.org joe\n")
    [t] = r.resolve("a@x.org")
    assert (t.address, t.mailer, t.target, t.hosts) == ("joe", "relay", "hub", ("10.0.0.9",))


def test_local_mailer_naming_a_pipe(tmp_path):
    r = router(tmp_path, "[core]\nlocal-mailer = md\n[pipe md]\nexec /bin/md ${RCPT_TO}\n[route]\na@x.org joe\n")
    assert outcome(r, "a@x.org") == ["joe pipe:md"]


def test_bare_address_looks_up_bare_key(tmp_path):
    assert outcome(router(tmp_path, "root joe\n"), "root") == ["joe pipe:procmail"]


def test_bare_address_falls_back_to_local_key(tmp_path):
    assert outcome(router(tmp_path, "root@ joe\n"), "root") == ["joe pipe:procmail"]


def test_bare_word_target_uses_local_key(tmp_path):
    assert outcome(router(tmp_path, "a@x.org joe\njoe@ joseph\n"), "a@x.org") == ["joseph pipe:procmail"]


def test_self_reference_is_the_local_user(tmp_path):
    r = router(tmp_path, "root root\njoe@ joe\n")
    assert (outcome(r, "root"), outcome(r, "joe@localhost")) == (["root pipe:procmail"], ["joe pipe:procmail"])


def test_postmaster_at_local_domain_without_entry_is_bare_postmaster(tmp_path):
    r = router(tmp_path, "[core]\nlocal-domains = example.org\n[route]\npostmaster joe\n")
    assert outcome(r, "Postmaster@Example.ORG") == ["joe pipe:procmail"]


def test_postmaster_at_key_domain_is_accepted(tmp_path):
    r = router(tmp_path, "[core]\nlocal-domains = example.org\n[route]\nsales@acme.example joe\n")
    assert outcome(r, "postmaster@acme.example") == ["postmaster pipe:procmail"]


def test_postmaster_at_foreign_domain_has_no_route(tmp_path):
    r = router(tmp_path, "[core]\nlocal-domains = example.org\n[route]\npostmaster joe\n")
    assert outcome(r, "postmaster@elsewhere.example") == "550 5.1.1"


def test_bare_postmaster_without_entry_is_local_user(tmp_path):
    assert outcome(router(tmp_path, ""), "postmaster") == ["postmaster pipe:procmail"]


def test_bare_postmaster_is_case_insensitive(tmp_path):
    assert outcome(router(tmp_path, ""), "PostMaster") == ["postmaster pipe:procmail"]


def test_postmaster_entry_wins_over_default(tmp_path):
    assert outcome(router(tmp_path, "postmaster jane\n"), "postmaster") == ["jane pipe:procmail"]


def test_local_rcpt_to_accepts_passwd_user(tmp_path):
    assert outcome(router(tmp_path, ""), "alice", local_rcpt_to=True) == ["alice pipe:procmail"]


def test_local_rcpt_to_rejects_unknown_user(tmp_path):
    assert outcome(router(tmp_path, ""), "mallory", local_rcpt_to=True) == "550 5.1.1"


def test_bare_name_without_local_rcpt_to_has_no_route(tmp_path):
    assert outcome(router(tmp_path, ""), "alice") == "550 5.1.1"


def test_local_rcpt_to_strips_extension(tmp_path):
    [t] = router(tmp_path, "[core]\nrecipient-delimiter = +\n").resolve("alice+x", local_rcpt_to=True)
    assert (t.address, t.extension) == ("alice", "x")


# -- loops and depth


def test_routing_loop_is_451(tmp_path):
    r = router(tmp_path, "a@x.org b@x.org\nb@x.org a@x.org\n")
    assert outcome(r, "a@x.org") == "451 4.3.0"


def test_domain_alias_loop_is_451(tmp_path):
    r = router(tmp_path, "@x.org @y.org\n@y.org @x.org\n")
    assert outcome(r, "u@x.org") == "451 4.3.0"


def test_bare_word_loop_is_451(tmp_path):
    assert outcome(router(tmp_path, "a b\nb a\n"), "a") == "451 4.3.0"


def chain(n):
    return "".join("k%d@x.org k%d@x.org\n" % (i, i + 1) for i in range(n)) + "k%d@x.org joe\n" % n


def test_depth_over_limit_is_451(tmp_path):
    assert outcome(router(tmp_path, chain(MAX_DEPTH + 5)), "k0@x.org") == "451 4.3.0"


def test_depth_at_limit_resolves(tmp_path):
    assert MAX_DEPTH == 20
    assert outcome(router(tmp_path, chain(MAX_DEPTH - 1)), "k0@x.org") == ["joe pipe:procmail"]


def test_loop_reply_text_mentions_lookup_failure(tmp_path):
    with pytest.raises(RouteError) as info:
        router(tmp_path, "a b\nb a\n").resolve("a")
    assert "routing loop" in str(info.value) and info.value.reply.code == 451


# -- the design note's example file


@pytest.fixture
def example():
    return Router(load(EXAMPLE), is_local_user=lambda name: name == "alice")


def test_example_extern_domain_alias_to_mx(example):
    [t] = example.resolve("joe@example.com", "extern")
    assert (t.address, t.mailer, t.hosts) == ("joe@example.org", "relay", ("mx.example.net",))


def test_example_local_routes_root_to_joe(example):
    [t] = example.resolve("root", "local-routes", local_rcpt_to=True)
    assert (t.address, t.target, t.argv) == ("joe", "procmail", ("/usr/bin/procmail", "-f", "${MAIL_FROM}", "-d", "joe"))


def test_example_postmaster_at_acme(example):
    assert outcome(example, "postmaster@acme.example.net") == ["joe pipe:procmail"]


def test_example_relay_section_name_is_not_used_without_a_key(example):
    assert outcome(example, "x@relay.example.org") == "550 5.1.1"


# -- static_check


def diags(tmp_path, text):
    path = tmp_path / "p.cf"
    path.write_text(text)
    return [(d.line, d.severity) for d in static_check(load(str(path)))]


def test_static_check_finds_loop(tmp_path):
    assert diags(tmp_path, "a@x.org b@x.org\nb@x.org a@x.org\n") == [(1, "error"), (2, "error")]


def test_static_check_warns_about_dead_target(tmp_path):
    assert diags(tmp_path, "a@x.org b@y.org\n") == [(1, "warning")]


def test_static_check_accepts_example():
    assert [d for d in static_check(load(EXAMPLE)) if d.is_error] == []


def test_static_check_open_relay_on_all_addresses(tmp_path):
    assert diags(tmp_path, "[smtpd mx]\nlisten-port 0.0.0.0:25\n[route]\n@ relay()\n") == [(1, "error")]


def test_static_check_no_open_relay_on_loopback(tmp_path):
    assert diags(tmp_path, "[smtpd mx]\nlisten-port 127.0.0.1:2525\n[route]\n@ relay()\n") == []


def test_static_check_no_open_relay_without_catch_all(tmp_path):
    assert diags(tmp_path, "[smtpd mx]\nlisten-port 0.0.0.0:25\n[route]\n@x.org relay()\n") == []
