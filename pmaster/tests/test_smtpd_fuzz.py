"""Hypothesis fuzz of the SMTP session: any command line gets a reply, and the session keeps working."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmaster.tests.daemon_fixture import InProcessSmtpd

CONFIG = """\
[core]
  hostname = mx.test
  spool-directory = {spool}
  pid-file = {tmp}/run/pmaster.pid
  min-free-space = 1k

[smtpd test]
  name = mx.test
  listen-port = 127.0.0.1:{port}
  max-message-size = 64k
  timeout = 10s

[route]
  @example.org  pipe(cat >/dev/null)
"""

REPLY_LINE = re.compile(r"^[2-5][0-9][0-9][ -]")

# Lines that start a transaction or stop the session: fuzzing them must still be answered, but
# DATA would switch to body mode and QUIT would close, so the checks below allow for both.
line_bytes = st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
prefixed = st.tuples(st.sampled_from([b"", b"EHLO ", b"HELO ", b"MAIL FROM:", b"RCPT TO:", b"VRFY ", b"NOOP ",
                                      b"mail from:<", b"RCPT TO:<", b"STARTTLS", b"EXPN "]),
                     line_bytes).map(lambda t: (t[0] + t[1])[:300])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with InProcessSmtpd(tmp_path_factory.mktemp("fuzz"), CONFIG) as srv:
        yield srv


def _session(server, line: bytes, transaction: bool) -> None:
    with server.client() as c:
        if transaction:
            assert c.cmd("EHLO fuzz.test")[-1].startswith("250 ")
            assert c.cmd("MAIL FROM:<a@sender.test>")[-1].startswith("250 ")
        c.send(line + b"\r\n")
        reply = c.reply()
        assert all(REPLY_LINE.match(x) for x in reply), reply
        last = reply[-1]
        if last.startswith("221") or last.startswith("421"):
            assert c.closed()
            return
        if last.startswith("354"):
            c.send(b"body\r\n.\r\n")
            assert REPLY_LINE.match(c.reply()[-1])
        assert c.cmd("NOOP")[-1].startswith("250 2.0.0")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=prefixed)
def test_any_command_line_gets_a_coded_reply_and_noop_works_after(server, line):
    _session(server, line, transaction=False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=prefixed)
def test_any_command_line_inside_a_transaction_gets_a_coded_reply(server, line):
    _session(server, line, transaction=True)
