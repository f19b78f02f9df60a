"""Tests for the configuration language and loader (SPEC sections 2 and 9): lexical rules, values, defaults,
relative paths and routing-file includes. Bad files live in test_config_errors.py."""

import os
import socket

import pytest

from pmaster.config import DEFAULT_PROCMAIL, load, load_with_diagnostics, parse_listen

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "postmaster.cf.example")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def cfg(tmp_path, text, name="p.cf"):
    return load(write(tmp_path / name, text))


def errors(tmp_path, text, name="p.cf"):
    config, diags = load_with_diagnostics(write(tmp_path / name, text))
    return [d for d in diags if d.is_error]


def route(config, key, table=None):
    return [t.text for t in config.routes[table].entries[key].targets]


# -- sections


def test_section_without_ident(tmp_path):
    c = cfg(tmp_path, "[core]\nworkers = 3\n")
    assert c.core.workers == 3


def test_section_with_bare_ident(tmp_path):
    c = cfg(tmp_path, "[pipe deliver]\nexec /bin/true\n")
    assert c.pipes["deliver"].exec == ("/bin/true",)


def test_section_with_quoted_ident(tmp_path):
    c = cfg(tmp_path, '[logfile "system-wide logfile"]\nfile = "/var/log/x"\n')
    assert c.logfiles["system-wide logfile"].file == "/var/log/x"


def test_section_header_may_be_indented(tmp_path):
    c = cfg(tmp_path, "  [core]\n  workers 2\n")
    assert c.core.workers == 2


def test_named_route_table_is_its_own_table(tmp_path):
    c = cfg(tmp_path, '[route "extern"]\n@example.org mx.example.net\n')
    assert route(c, "@example.org", "extern") == ["mx.example.net"]


# -- assignments and values


def test_equals_sign_is_optional(tmp_path):
    c = cfg(tmp_path, "[core]\nworkers 4\nretry-min = 1m\n")
    assert (c.core.workers, c.core.retry_min) == (4, 60)


def test_assignment_without_spaces_around_equals(tmp_path):
    c = cfg(tmp_path, "[core]\nworkers=5\n")
    assert c.core.workers == 5


def test_equals_inside_value_word_is_text(tmp_path):
    c = cfg(tmp_path, "[pipe p]\nexec = /usr/bin/deliver --to=${RCPT_TO} a=b\n")
    assert c.pipes["p"].exec == ("/usr/bin/deliver", "--to=${RCPT_TO}", "a=b")


def test_equals_inside_value_word_without_separator(tmp_path):
    c = cfg(tmp_path, "[pipe p]\nexec /usr/bin/deliver --to=${RCPT_TO}\n")
    assert c.pipes["p"].exec == ("/usr/bin/deliver", "--to=${RCPT_TO}")


def test_equals_right_after_key_separates(tmp_path):
    c = cfg(tmp_path, "[core]\nhostname= a.example\n[syslog]\nident =b=c\n")
    assert (c.core.hostname, c.syslog.ident) == ("a.example", "b=c")


def test_multi_word_value(tmp_path):
    c = cfg(tmp_path, "[pipe p]\nexec = /usr/bin/procmail -f ${MAIL_FROM} -d ${RCPT_TO}\n")
    assert c.pipes["p"].exec == ("/usr/bin/procmail", "-f", "${MAIL_FROM}", "-d", "${RCPT_TO}")


def test_quoted_values_keep_spaces(tmp_path):
    c = cfg(tmp_path, '[pipe p]\nexec = "/usr/bin/my prog" "a b"\n')
    assert c.pipes["p"].exec == ("/usr/bin/my prog", "a b")


def test_quoted_value_escapes_quote_and_backslash(tmp_path):
    c = cfg(tmp_path, r'[pipe p]' "\n" r'exec = "/bin/echo" "say \"hi\"" "back\\slash"' "\n")
    assert c.pipes["p"].exec == ("/bin/echo", 'say "hi"', "back\\slash")


def test_repeated_repeatable_key_appends(tmp_path):
    c = cfg(tmp_path, "[relay r]\naddress = 10.0.0.1\naddress = 10.0.0.2\n")
    assert c.relays["r"].addresses == ("10.0.0.1", "10.0.0.2")


def test_repeated_listen_port_appends(tmp_path):
    c = cfg(tmp_path, "[smtpd localhost]\nlisten-port 127.0.0.1:2525\nlisten-port [::1]:2525\n")
    assert c.smtpd["localhost"].listen_ports == ("127.0.0.1:2525", "[::1]:2525")


def test_route_section_may_be_reopened(tmp_path):
    c = cfg(tmp_path, "a@x joe\n[core]\nworkers 1\n[route]\nb@x jane\n")
    assert set(c.routes[None].entries) == {"a@x", "b@x"}


# -- comments


def test_hash_comment_after_value(tmp_path):
    c = cfg(tmp_path, "[core]\nworkers = 3   # three\n")
    assert c.core.workers == 3


def test_slash_slash_comment_line(tmp_path):
    c = cfg(tmp_path, "// deliver to local mailbox\njoe.doe@example.org joe // trailing\n")
    assert route(c, "joe.doe@example.org") == ["joe"]


def test_comment_only_file_is_valid(tmp_path):
    c = cfg(tmp_path, "# nothing here\n// nor here\n")
    assert c.routes[None].entries == {}


def test_hash_inside_pipe_call_is_not_a_comment(tmp_path):
    c = cfg(tmp_path, "abuse@x pipe(/usr/bin/cat >/dev/null # keep) # c\n")
    assert route(c, "abuse@x") == ["pipe(/usr/bin/cat >/dev/null # keep)"]


def test_slashes_inside_pipe_call_are_not_a_comment(tmp_path):
    c = cfg(tmp_path, "abuse@acme.example.com pipe(/usr/bin/cat >/dev/null) # c\n")
    entry = c.routes[None].entries["abuse@acme.example.com"]
    assert entry.targets[0].args == ("/usr/bin/cat >/dev/null",)


def test_hash_inside_word_is_not_a_comment(tmp_path):
    c = cfg(tmp_path, "[syslog]\nident = post#master\n")
    assert c.syslog.ident == "post#master"


def test_comment_marker_inside_quoted_string_is_kept(tmp_path):
    c = cfg(tmp_path, '[logfile l]\nfile = "/var/log/x#y//z"\n')
    assert c.logfiles["l"].file == "/var/log/x#y/z"  # normpath folds '//'; the text after it is kept


# -- line continuation


def test_trailing_comma_continues_line(tmp_path):
    c = cfg(tmp_path, "dow.joe@example.org joe@example.net,\n    joe@example.com\n")
    assert route(c, "dow.joe@example.org") == ["joe@example.net", "joe@example.com"]


def test_trailing_comma_continues_line_with_comment_after_it(tmp_path):
    c = cfg(tmp_path, "x@y a@b, # first\n  // more to come\n\n  c@d\n")
    assert route(c, "x@y") == ["a@b", "c@d"]


def test_continued_line_may_start_with_bracket_word(tmp_path):
    c = cfg(tmp_path, "[smtpd localhost]\nlisten-port = 127.0.0.1:25,\n  [::1]:25\n")
    assert c.smtpd["localhost"].listen_ports == ("127.0.0.1:25", "[::1]:25")


def test_line_without_trailing_newline(tmp_path):
    c = cfg(tmp_path, "[core]\nworkers 6")
    assert c.core.workers == 6


# -- the implicit [route]


def test_text_before_first_header_belongs_to_route(tmp_path):
    c = cfg(tmp_path, "postmaster joe\n[core]\nworkers 2\n")
    assert route(c, "postmaster") == ["joe"]


def test_route_keys_are_lower_cased(tmp_path):
    c = cfg(tmp_path, "Postmaster@Example.ORG joe\n")
    assert "postmaster@example.org" in c.routes[None].entries


def test_routing_entries_with_equals(tmp_path):
    c = cfg(tmp_path, "@example.org = @example.net\njoe@example.net = joe\n")
    assert route(c, "@example.org") == ["@example.net"] and route(c, "joe@example.net") == ["joe"]


def test_relay_call_with_several_hosts(tmp_path):
    c = cfg(tmp_path, "@ relay(isp.example.net, 10.33.0.1)\n")
    assert c.routes[None].entries["@"].targets[0].args == ("isp.example.net", "10.33.0.1")


def test_empty_relay_call_means_mx(tmp_path):
    c = cfg(tmp_path, "@example.net relay()\n")
    target = c.routes[None].entries["@example.net"].targets[0]
    assert (target.kind, target.args) == ("relay", ())


# -- durations, sizes, booleans


@pytest.mark.parametrize("text, seconds", [("300", 300), ("45s", 45), ("5m", 300), ("4h", 14400), ("5d", 432000)])
def test_duration_values(tmp_path, text, seconds):
    assert cfg(tmp_path, "[core]\nretry-max = %s\nretry-min = 1\n" % text).core.retry_max == seconds


@pytest.mark.parametrize("text, size", [("512", 512), ("10k", 10 * 1024), ("10K", 10 * 1024),
                                        ("10M", 10 * 1024 ** 2), ("2G", 2 * 1024 ** 3)])
def test_sizes_are_powers_of_1024(tmp_path, text, size):
    assert cfg(tmp_path, "[core]\nmin-free-space = %s\n" % text).core.min_free_space == size


@pytest.mark.parametrize("text, value", [("yes", True), ("no", False), ("true", True), ("false", False),
                                         ("on", True), ("off", False), ("1", True), ("0", False),
                                         ("Yes", True), ("OFF", False)])
def test_boolean_values(tmp_path, text, value):
    c = cfg(tmp_path, "[smtpd localhost]\nlocal-rcpt-to = %s\n" % text)
    assert c.smtpd["localhost"].local_rcpt_to is value


@pytest.mark.parametrize("text", ["25", "smtp", "mail.example.org:25", "mail.example.org:smtp", "[::1]:25", "*:25",
                                  "0.0.0.0:25", "[::]:25", "127.0.0.1:2525", "ipv6-localhost:submission"])
def test_listen_port_forms_parse(tmp_path, text):
    c = cfg(tmp_path, "[smtpd localhost]\nlisten-port = %s\n" % text)
    assert c.smtpd["localhost"].listen_ports == (text,)


def test_bare_listen_port_binds_to_the_smtpd_name():
    assert parse_listen("25", "mx.example.net") == ("mx.example.net", "25")


def test_listen_port_wildcard_means_all_addresses():
    assert parse_listen("*:25", "x") == ("*", "25")


def test_absent_listen_port_means_ident_smtp(tmp_path):
    assert cfg(tmp_path, "[smtpd mx.example.net]\n").smtpd["mx.example.net"].listen_ports == ("mx.example.net:smtp",)


def test_absent_listen_port_of_ipv6_ident_is_bracketed(tmp_path):
    assert cfg(tmp_path, '[smtpd "::1"]\n').smtpd["::1"].listen_ports == ("[::1]:smtp",)


def test_dns_server_with_port(tmp_path):
    assert cfg(tmp_path, "[core]\ndns-server = 127.0.0.1:5353\n").core.dns_server == ("127.0.0.1", 5353)


def test_dns_server_default_port_is_53(tmp_path):
    assert cfg(tmp_path, "[core]\ndns-server = ::1\n").core.dns_server == ("::1", 53)


def test_local_domains_take_several_words(tmp_path):
    c = cfg(tmp_path, "[core]\nlocal-domains = Example.ORG example.net.\n")
    assert c.core.local_domains == ("example.org", "example.net")


def test_spf_off_is_accepted(tmp_path):
    assert cfg(tmp_path, "[smtpd localhost]\nspf = off\n").smtpd["localhost"].spf == "off"


# -- defaults (SPEC section 2)


@pytest.fixture
def empty(tmp_path):
    return cfg(tmp_path, "")


def test_default_hostname_is_the_machine_name(empty):
    assert empty.core.hostname == (socket.gethostname().lower().rstrip(".") or "localhost")


def test_default_hostname_at_start_is_fully_qualified(tmp_path):
    c = load(write(tmp_path / "p.cf", ""), machine=True)
    name = socket.gethostname()
    expected = name if "." in name else socket.getfqdn()
    assert c.core.hostname == (expected.lower().rstrip(".") or "localhost")


def test_default_workers(empty):
    assert empty.core.workers == 8


def test_default_retry_min(empty):
    assert empty.core.retry_min == 5 * 60


def test_default_retry_max(empty):
    assert empty.core.retry_max == 4 * 3600


def test_default_queue_lifetime(empty):
    assert empty.core.queue_lifetime == 5 * 86400


def test_default_min_free_space(empty):
    assert empty.core.min_free_space == 100 * 1024 * 1024


def test_default_destination_concurrency(empty):
    assert empty.core.destination_concurrency == 10


def test_default_spool_directory_and_pid_file(empty):
    assert (empty.core.spool_directory, empty.core.pid_file) == ("/var/spool/postmaster", "/var/run/postmaster.pid")


def test_default_logger_is_unset(empty):
    assert empty.core.logger is None


def test_default_local_mailer_is_procmail(empty):
    assert empty.core.local_mailer == "procmail"


def test_default_syslog(empty):
    assert (empty.syslog.ident, empty.syslog.facility) == ("postmaster", "mail")


@pytest.fixture
def smtpd(tmp_path):
    return cfg(tmp_path, "[smtpd localhost]\n").smtpd["localhost"]


def test_default_smtpd_name_is_ident(smtpd):
    assert smtpd.name == "localhost"


def test_default_max_message_size(smtpd):
    assert smtpd.max_message_size == 25 * 1024 * 1024


def test_default_max_recipients(smtpd):
    assert smtpd.max_recipients == 100


def test_default_max_connections(smtpd):
    assert smtpd.max_connections == 200


def test_default_max_connections_per_ip(smtpd):
    assert smtpd.max_connections_per_ip == 20


def test_default_smtpd_timeout(smtpd):
    assert smtpd.timeout == 300


def test_default_smtpd_switches(smtpd):
    assert (smtpd.local_rcpt_to, smtpd.require_tls, smtpd.spf, smtpd.bare_newline, smtpd.tls_enabled) == \
        (False, False, "off", "normalize", False)


def test_default_routing_table_is_unnamed(smtpd):
    assert smtpd.routing_table is None


def test_default_pipe_timeout_and_max_rcpt_to(tmp_path):
    pipe = cfg(tmp_path, "[pipe p]\nexec /bin/true\n").pipes["p"]
    assert (pipe.timeout, pipe.max_rcpt_to, pipe.user) == (600, 1, None)


def test_default_relay_port_tls_and_name(tmp_path):
    relay = cfg(tmp_path, "[relay smart.example.net]\n").relays["smart.example.net"]
    assert (relay.port, relay.tls, relay.name, relay.addresses) == (25, "opportunistic", "smart.example.net", ())


def test_builtin_procmail_pipe_when_no_section(empty):
    assert empty.pipes["procmail"].exec == DEFAULT_PROCMAIL == \
        ("/usr/bin/procmail", "-f", "${MAIL_FROM}", "-d", "${RCPT_TO}")


def test_procmail_section_replaces_builtin(tmp_path):
    c = cfg(tmp_path, "[pipe procmail]\nexec /usr/local/bin/procmail -d ${RCPT_TO}\nmax_rcpt_to 16\n")
    assert (c.pipes["procmail"].exec[0], c.pipes["procmail"].max_rcpt_to) == ("/usr/local/bin/procmail", 16)


def test_no_builtin_procmail_when_local_mailer_differs(tmp_path):
    c = cfg(tmp_path, "[core]\nlocal-mailer = deliver\n[pipe deliver]\nexec /bin/true\n")
    assert "procmail" not in c.pipes


def test_local_mailer_may_name_a_relay(tmp_path):
    c = cfg(tmp_path, "[core]\nlocal-mailer = hub\n[relay hub]\naddress 10.0.0.1\n")
    assert c.core.local_mailer == "hub" and "procmail" not in c.pipes


def test_default_local_domains(tmp_path):
    c = cfg(tmp_path, "[core]\nhostname = Mail.Example.ORG\n[smtpd mx]\nname = mx.example.net\n")
    assert c.local_domains() == ("mail.example.org", "localhost", "mx.example.net")


def test_local_domains_setting_replaces_default(tmp_path):
    c = cfg(tmp_path, "[core]\nhostname = mail.example.org\nlocal-domains = example.org\n[smtpd mx.example.net]\n")
    assert c.local_domains() == ("example.org",)


def test_design_note_example_loads(tmp_path):
    c = load(EXAMPLE)
    assert set(c.routes) == {None, "local-routes", "extern"} and c.smtpd["localhost"].local_rcpt_to


def test_design_note_example_warns_only_about_the_machine():
    config, diags = load_with_diagnostics(EXAMPLE)
    assert config is not None and all(d.severity == "warning" for d in diags)


# -- relative paths


def test_relative_spool_directory_is_relative_to_config_file(tmp_path):
    c = cfg(tmp_path, "[core]\nspool-directory = var/spool\n", name="etc/p.cf")
    assert c.core.spool_directory == str(tmp_path / "etc" / "var" / "spool")


def test_relative_pid_file_is_relative_to_config_file(tmp_path):
    c = cfg(tmp_path, "[core]\npid-file = ../run/p.pid\n", name="etc/p.cf")
    assert c.core.pid_file == str(tmp_path / "run" / "p.pid")


def test_relative_logfile_is_relative_to_config_file(tmp_path):
    c = cfg(tmp_path, "[logfile l]\nfile = log/pm-%Y-%m-%d\n", name="etc/p.cf")
    assert c.logfiles["l"].file == str(tmp_path / "etc" / "log" / "pm-%Y-%m-%d")


def test_relative_tls_files_are_relative_to_config_file(tmp_path):
    write(tmp_path / "etc" / "tls" / "c.pem", "x")
    write(tmp_path / "etc" / "tls" / "k.pem", "x")
    c = cfg(tmp_path, "[smtpd localhost]\ntls-certificate tls/c.pem\ntls-key tls/k.pem\n", name="etc/p.cf")
    s = c.smtpd["localhost"]
    assert (s.tls_certificate, s.tls_key, s.tls_enabled) == \
        (str(tmp_path / "etc" / "tls" / "c.pem"), str(tmp_path / "etc" / "tls" / "k.pem"), True)


def test_absolute_paths_are_kept(tmp_path):
    c = cfg(tmp_path, "[core]\nspool-directory = /var/spool/x\n", name="etc/p.cf")
    assert c.core.spool_directory == "/var/spool/x"


def test_relative_config_path_resolves_against_its_directory(tmp_path, monkeypatch):
    write(tmp_path / "etc" / "p.cf", "[core]\nspool-directory = spool\n")
    monkeypatch.chdir(tmp_path)
    assert load(os.path.join("etc", "p.cf")).core.spool_directory == str(tmp_path / "etc" / "spool")


# -- includes


def test_include_adds_entries_to_enclosing_table(tmp_path):
    write(tmp_path / "extra.rt", "joe@example.org joe\n")
    c = cfg(tmp_path, '[route "ext"]\n@ relay()\nfile "extra.rt"\n')
    assert set(c.routes["ext"].entries) == {"@", "joe@example.org"} and "joe@example.org" not in c.routes[None].entries


def test_include_into_implicit_route(tmp_path):
    write(tmp_path / "a.rt", "a@x joe\n")
    c = cfg(tmp_path, 'file "a.rt"\n')
    assert route(c, "a@x") == ["joe"]


def test_include_relative_to_including_file(tmp_path):
    write(tmp_path / "etc" / "rt" / "a.rt", "a@x joe\n")
    c = cfg(tmp_path, 'file "rt/a.rt"\n', name="etc/p.cf")
    assert route(c, "a@x") == ["joe"]


def test_nested_include_relative_to_its_own_directory(tmp_path):
    write(tmp_path / "etc" / "sub" / "a.rt", 'a@x joe\nfile "deeper/b.rt"\n')
    write(tmp_path / "etc" / "sub" / "deeper" / "b.rt", "b@x jane\n")
    c = cfg(tmp_path, 'file "sub/a.rt"\n', name="etc/p.cf")
    assert set(c.routes[None].entries) == {"a@x", "b@x"}


def test_included_entry_position_names_the_included_file(tmp_path):
    path = write(tmp_path / "a.rt", "\n\na@x joe\n")
    c = cfg(tmp_path, 'file "a.rt"\n')
    pos = c.routes[None].entries["a@x"].pos
    assert (pos.file, pos.line, pos.col) == (path, 3, 1)


def test_include_loop_is_an_error(tmp_path):
    write(tmp_path / "a.rt", 'file "b.rt"\n')
    write(tmp_path / "b.rt", 'file "a.rt"\n')
    errs = errors(tmp_path, 'file "a.rt"\n')
    assert len(errs) == 1 and "include loop" in errs[0].message and errs[0].file.endswith("b.rt")


def test_file_including_itself_is_an_error(tmp_path):
    errs = errors(tmp_path, 'file "p.cf"\n')
    assert [(e.line, e.col) for e in errs] == [(1, 1)] and "include loop" in errs[0].message


def test_missing_include_is_a_warning_in_check(tmp_path):
    config, diags = load_with_diagnostics(write(tmp_path / "p.cf", 'file "nope.rt"\n'))
    assert config is not None and [(d.line, d.col, d.severity) for d in diags] == [(1, 1, "warning")]


def test_missing_include_is_an_error_at_start(tmp_path):
    config, diags = load_with_diagnostics(write(tmp_path / "p.cf", 'file "nope.rt"\n'), machine=True)
    assert config is None and [(d.line, d.col, d.severity) for d in diags] == [(1, 1, "error")]


def test_warnings_are_kept_in_config(tmp_path):
    c = cfg(tmp_path, "[frobnicate]\nx y\n")
    assert [(d.line, d.severity) for d in c.diagnostics] == [(1, "warning")]


def test_unknown_section_contents_are_ignored(tmp_path):
    c = cfg(tmp_path, "[frobnicate]\nx@y z\n")
    assert "x@y" not in c.routes[None].entries


def test_trusted_networks_default_is_loopback(tmp_path):
    core = cfg(tmp_path, "[route]\n@ relay()\n").core
    assert core.is_trusted("127.0.0.1") and core.is_trusted("::1")
    assert not core.is_trusted("127.0.0.2")


def test_trusted_networks_take_addresses_and_cidr_networks(tmp_path):
    core = cfg(tmp_path, "[core]\ntrusted-networks = 10.0.0.0/8 192.0.2.7 2001:db8::/32\n").core
    assert core.is_trusted("10.9.8.7") and core.is_trusted("::ffff:10.0.0.1") and core.is_trusted("2001:db8::5")
    assert core.is_trusted("192.0.2.7") and not core.is_trusted("192.0.2.8") and not core.is_trusted("127.0.0.1")


def test_trusted_networks_refuse_a_word_that_is_no_network(tmp_path):
    assert [(e.line, e.col) for e in errors(tmp_path, "[core]\ntrusted-networks = 10.0.0.0/8 bogus\n")] == [(2, 31)]


def test_policy_service_timeout_defaults_to_ten_seconds_and_takes_a_duration(tmp_path):
    assert cfg(tmp_path, "[smtpd x]\nlisten-port = 2525\n").smtpd["x"].policy_service_timeout == 10
    text = "[smtpd x]\nlisten-port = 2525\npolicy-service-timeout = 1m\n"
    assert cfg(tmp_path, text).smtpd["x"].policy_service_timeout == 60

def test_spf_reject_dnsbl_zones_and_verify_recipients_are_accepted(tmp_path):
    c = cfg(tmp_path, "[smtpd localhost]\nspf = reject\ndnsbl = a.example. B.example\ndnsbl c.example\n"
                      "[relay inside]\nverify-recipients = yes\n")
    assert (c.smtpd["localhost"].spf, c.smtpd["localhost"].dnsbl, c.relays["inside"].verify_recipients) == \
        ("reject", ("a.example", "b.example", "c.example"), True)
