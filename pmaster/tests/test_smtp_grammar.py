"""SMTP command-line grammar: valid and invalid lines, fuzzing, threads, python -OO."""

import dataclasses
import os
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmaster.errors import SmtpError
from pmaster.grammar.smtp import Command, SmtpSyntaxError, parse_command

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VALID = [
    # line, verb, attribute, expected value
    ("HELO mx.example.org", "HELO", "domain", "mx.example.org"),
    ("ehlo [192.0.2.1]", "EHLO", "domain", "[192.0.2.1]"),
    ("EHLO  client.example  ", "EHLO", "domain", "client.example"),
    ("EHLO\tclient.example", "EHLO", "domain", "client.example"),
    ("MAIL FROM:<joe@example.org>", "MAIL", "address", "joe@example.org"),
    ("mail from:<joe@example.org>", "MAIL", "address", "joe@example.org"),
    ("MAIL FROM: <joe@example.org>", "MAIL", "address", "joe@example.org"),
    ("MAIL FROM:<>", "MAIL", "address", ""),
    ("MAIL FROM:joe@example.org", "MAIL", "address", "joe@example.org"),
    ("MAIL FROM:<Joe@EXAMPLE.Org.>", "MAIL", "address", "Joe@example.org"),
    ('MAIL FROM:<"john doe"@example.org>', "MAIL", "address", '"john doe"@example.org'),
    ('RCPT TO:<"a@b"@example.org>', "RCPT", "address", '"a@b"@example.org'),
    ('RCPT TO:<"quo\\"te"@example.org>', "RCPT", "address", '"quo\\"te"@example.org'),
    ("RCPT TO:<@a.example,@b.example:user@c.example>", "RCPT", "address", "user@c.example"),
    ("RCPT TO:<@a.example:user@c.example>", "RCPT", "address", "user@c.example"),
    ("RCPT TO:<user@[192.0.2.7]>", "RCPT", "address", "user@[192.0.2.7]"),
    ("RCPT TO:<user@[IPv6:2001:db8::1]>", "RCPT", "address", "user@[ipv6:2001:db8::1]"),
    ("RCPT TO:<postmaster>", "RCPT", "address", "postmaster"),
    ("RCPT TO:<Postmaster>", "RCPT", "address", "Postmaster"),
    ("rcpt to: <joe+news@example.org>", "RCPT", "address", "joe+news@example.org"),
    ("RCPT TO:<j\u00f6rg@example.org>", "RCPT", "address", "j\u00f6rg@example.org"),
    ("RCPT TO:<-oops@example.org>", "RCPT", "address", "-oops@example.org"),
    ("RCPT TO:<a.b-c_d@sub-1.example.org>", "RCPT", "address", "a.b-c_d@sub-1.example.org"),
    ("VRFY joe", "VRFY", "argument", "joe"),
    ('MAIL FROM:<"a(b);c"@example.org>', "MAIL", "address", '"a(b);c"@example.org'),
    ("EXPN staff list", "EXPN", "argument", "staff list"),
    ("EXPN", "EXPN", "argument", None),
    ("NOOP", "NOOP", "argument", None),
    ("NOOP anything at all", "NOOP", "argument", "anything at all"),
    ("HELP", "HELP", "argument", None),
    ("HELP MAIL", "HELP", "argument", "MAIL"),
    ("TURN", "TURN", "argument", None),
    ("SEND FROM:<a@b>", "SEND", "argument", "FROM:<a@b>"),
    ("SOML FROM:<a@b>", "SOML", "argument", "FROM:<a@b>"),
    ("SAML FROM:<a@b>", "SAML", "argument", "FROM:<a@b>"),
    ("DATA", "DATA", "verb", "DATA"),
    ("rset", "RSET", "verb", "RSET"),
    ("QUIT ", "QUIT", "verb", "QUIT"),
    ("StartTLS", "STARTTLS", "verb", "STARTTLS"),
    ("QUIT\r\n", "QUIT", "verb", "QUIT"),
]

VALID_PARAMS = [
    ("MAIL FROM:<a@b.example> SIZE=123 BODY=8BITMIME", {"SIZE": "123", "BODY": "8BITMIME"}),
    ("MAIL FROM:<a@b.example> size=123 body=7bit", {"SIZE": "123", "BODY": "7bit"}),
    ("MAIL FROM:<a@b.example>  SIZE=1 ", {"SIZE": "1"}),
    ("MAIL FROM:<a@b.example> SMTPUTF8", {"SMTPUTF8": None}),
    ("MAIL FROM:<a@b.example> AUTH=<>", {"AUTH": "<>"}),
    ("MAIL FROM:a@b.example SIZE=5", {"SIZE": "5"}),
    ("RCPT TO:<a@b.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b.example",
     {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a@b.example"}),
    ("MAIL FROM:<a@b.example>", {}),
]

UNKNOWN = ["", " ", "XYZZY", "MAILFROM:<a@b>", " MAIL FROM:<a@b>", "QUIT.", "\u017ftarttls", "HELO\x00x", "12345",
           "AUTH PLAIN AGFiYwBkZWY=", "BDAT 10 LAST"]

BAD_ARGS = [
    "HELO", "EHLO ", "HELO bad\x01name", "VRFY", "DATA now", "RSET x", "QUIT now", "STARTTLS x",
    "MAIL", "MAIL FROM", "MAIL TO:<a@b>", "MAIL FROM <a@b>", "MAIL FROM:<a@b> SIZE=", "MAIL FROM:<a@b> =1",
    "MAIL FROM:<a@b> SIZE=1 SIZE=2", "MAIL FROM:<a@b> -X=1", "MAIL FROM:<a@b> X=\u00e9", "MAIL FROM:<a@b>SIZE=1",
    "RCPT", "RCPT FROM:<a@b>", "RCPT TO <a@b>",
]

BAD_SENDER = [
    "MAIL FROM:", "MAIL FROM:<", "MAIL FROM:<a@b", "MAIL FROM:<a@@b>", "MAIL FROM:<a@>", "MAIL FROM:<@b>",
    "MAIL FROM:<a b@c>", "MAIL FROM:<a@b..c>", "MAIL FROM:<a@[1.2.3.999]>", "MAIL FROM:<a@[IPv6:zz]>",
    "MAIL FROM:<a@[nonsense]>", 'MAIL FROM:<"unterminated@b>', "MAIL FROM:<a@b\x01c>", "MAIL FROM:<<a@b>>",
    "MAIL FROM:<@a:>", "MAIL FROM:<a@b,c>", "MAIL FROM:a@",
    "MAIL FROM:<a(b)c@example.org>", "MAIL FROM:<a`x`$(touch${IFS}p)|y@sender.test>", "MAIL FROM:<a;b@x.org>",
]

BAD_RECIPIENT = ["RCPT TO:<>", "RCPT TO:", "RCPT TO:<a@b", "RCPT TO:<a@b@c>", "RCPT TO:<@x,:a@b>",
                 "RCPT TO:<x\\y@b.org>", "RCPT TO:<(comment)joe@b.org>", "RCPT TO:<joe@-oq>",
                 "RCPT TO:<joe@ab-.example.org>"]


@pytest.mark.parametrize("line,verb,attr,expected", VALID)
def test_valid_line_parses_to_command(line, verb, attr, expected):
    cmd = parse_command(line)
    assert isinstance(cmd, Command)
    assert cmd.verb == verb
    assert getattr(cmd, attr) == expected


@pytest.mark.parametrize("line,params", VALID_PARAMS)
def test_esmtp_parameters_are_keyed_upper_case(line, params):
    assert parse_command(line).params == params


def _reply(line):
    with pytest.raises(SmtpSyntaxError) as info:
        parse_command(line)
    return info.value.reply


@pytest.mark.parametrize("line", UNKNOWN)
def test_unknown_verb_is_500(line):
    r = _reply(line)
    assert (r.code, r.enhanced) == (500, "5.5.2")


@pytest.mark.parametrize("line", BAD_ARGS)
def test_bad_arguments_are_501_5_5_4(line):
    r = _reply(line)
    assert (r.code, r.enhanced) == (501, "5.5.4")


@pytest.mark.parametrize("line", BAD_SENDER)
def test_bad_sender_address_is_501_5_1_7(line):
    r = _reply(line)
    assert (r.code, r.enhanced) == (501, "5.1.7")


@pytest.mark.parametrize("line", BAD_RECIPIENT)
def test_bad_recipient_address_is_501_5_1_3(line):
    r = _reply(line)
    assert (r.code, r.enhanced) == (501, "5.1.3")


def test_syntax_error_is_an_smtp_error_with_usage_text():
    r = _reply("HELO")
    assert "HELO hostname" in r.text
    assert isinstance(SmtpSyntaxError(r), SmtpError)


def test_command_is_frozen():
    cmd = parse_command("QUIT")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cmd.verb = "DATA"


def _parses_or_refuses(line):
    try:
        result = parse_command(line)
    except SmtpSyntaxError as exc:
        assert exc.reply.code in (500, 501)
        return
    assert isinstance(result, Command)


_fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fuzz
@given(st.text())
def test_any_text_parses_or_raises_syntax_error(line):
    _parses_or_refuses(line)


@_fuzz
@given(st.binary().map(lambda b: b.decode("latin-1")))
def test_any_latin1_bytes_parse_or_raise_syntax_error(line):
    _parses_or_refuses(line)


_PREFIXES = ["MAIL FROM:", "RCPT TO:", "MAIL FROM:<", "RCPT TO:<@", "HELO ", "EHLO ", "VRFY ", "NOOP ", "DATA"]


@_fuzz
@given(st.sampled_from(_PREFIXES), st.text(alphabet=st.sampled_from('<>@,:="[]\\ .aZ09-\u00e9\x00\t'), max_size=40))
def test_verb_with_any_argument_parses_or_raises_syntax_error(prefix, rest):
    _parses_or_refuses(prefix + rest)


def test_concurrent_threads_get_their_own_results():
    lines = [("MAIL FROM:<t%d@example.org> SIZE=%d" % (i, i), "t%d@example.org" % i, str(i)) for i in range(50)]
    errors = []
    barrier = threading.Barrier(8)

    def worker(offset):
        try:
            barrier.wait(timeout=10)
            for n in range(300):
                line, addr, size = lines[(n + offset) % len(lines)]
                cmd = parse_command(line)
                if (cmd.address, cmd.params.get("SIZE")) != (addr, size):
                    errors.append((line, cmd))
                try:
                    parse_command("RCPT TO:<a@@b>")
                    errors.append("no error for a bad line")
                except SmtpSyntaxError as exc:
                    if exc.reply.enhanced != "5.1.3":
                        errors.append(exc.reply)
        except Exception as exc:  # reported below, never lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i * 7,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_grammar_works_under_python_OO_and_prints_nothing():
    code = "from pmaster.grammar.smtp import parse_command; print(parse_command('RCPT TO:<u@[1.2.3.4]>').address)"
    proc = subprocess.run([sys.executable, "-OO", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "u@[1.2.3.4]\n"
    assert proc.stderr == ""
