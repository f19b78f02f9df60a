"""policy-service: Postfix's policy delegation protocol against a scripted policy server on loopback,
a real listener in this process, and exec: programs (SPEC 6)."""

import logging
import os
import sys
import textwrap
import time

import pytest

from pmaster.metrics import Metrics
from pmaster.policy import chain as chain_mod
from pmaster.policy.chain import Check
from pmaster.reply import Reply
from pmaster.tests.daemon_fixture import InProcessSmtpd, RawClient, free_port, wait_until
from pmaster.tests.policyserver import CLOSE, CLOSE_AFTER, HANG, PolicyServer, action_answer

CONFIG = """\
[core]
  hostname = mx.test
  spool-directory = {spool}
[smtpd test]
  name = mx.test
  listen-port = 127.0.0.1:{port}
  policy-service = {service}
  policy-service-timeout = 2
[route]
  @example.org  pipe(cat >/dev/null)
"""

SPEC_ATTRIBUTES = ("request", "protocol_state", "protocol_name", "helo_name", "queue_id", "sender", "recipient",
                   "recipient_count", "client_address", "client_name", "reverse_client_name", "instance", "size",
                   "encryption_protocol", "encryption_cipher", "sasl_username")


class _Smtpd(InProcessSmtpd):
    """Closes the test's clients first: a session still open would hold the listener's thread."""

    def client(self, **kwargs):
        c = RawClient(self.host, self.port, **kwargs)
        self.__dict__.setdefault("clients", []).append(c)
        return c

    def __exit__(self, *exc):
        for c in self.__dict__.get("clients", []):
            c.close()
        InProcessSmtpd.__exit__(self, *exc)


def _smtpd(tmp_path, service, config=CONFIG):
    return _Smtpd(tmp_path, config, values={"service": service})


def _inet(server):
    return "inet:%s:%d" % server.address


def _rcpt(srv, rcpt="u@example.org"):
    """A session up to RCPT; returns (client, RCPT reply lines)."""
    c = srv.client()
    assert c.cmd("EHLO client.test")[-1].startswith("250")
    assert c.cmd("MAIL FROM:<s@sender.test> SIZE=123")[0].startswith("250")
    return c, c.cmd("RCPT TO:<%s>" % rcpt)


def _send(c, body=b"Subject: t\r\n\r\nhello\r\n"):
    assert c.cmd("DATA")[0].startswith("354")
    c.send(body + b".\r\n")
    return c.reply()


def _answering(action):
    return PolicyServer(lambda attrs: action_answer(action))


def test_request_carries_every_attribute_of_spec_6(tmp_path):
    with _answering("DUNNO") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        c, reply = _rcpt(srv)
        assert reply[0].startswith("250")
        attrs = ps.requests[0]
    assert set(SPEC_ATTRIBUTES) <= set(attrs)
    assert attrs["request"] == "smtpd_access_policy"
    assert attrs["protocol_state"] == "RCPT"
    assert attrs["protocol_name"] == "ESMTP"
    assert attrs["helo_name"] == "client.test"
    assert (attrs["sender"], attrs["recipient"]) == ("s@sender.test", "u@example.org")
    assert (attrs["client_address"], attrs["size"], attrs["recipient_count"]) == ("127.0.0.1", "123", "0")
    assert attrs["instance"] and attrs["sasl_username"] == "" and attrs["encryption_protocol"] == ""


def test_instance_is_the_same_within_a_transaction_and_changes_with_the_next(tmp_path):
    with _answering("DUNNO") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        c, _ = _rcpt(srv)
        c.cmd("RCPT TO:<v@example.org>")
        c.cmd("RSET")
        c.cmd("MAIL FROM:<s@sender.test>")
        c.cmd("RCPT TO:<w@example.org>")
        first, second, third = (r["instance"] for r in ps.requests)
    assert first == second != third


@pytest.mark.parametrize("action", ["OK", "DUNNO", "ok", "DUNNO ignored text"])
def test_ok_and_dunno_accept_the_recipient(tmp_path, action):
    with _answering(action) as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        c, reply = _rcpt(srv)
        assert reply == ["250 2.1.5 Recipient OK"]
        assert _send(c)[0].startswith("250")
        assert len(srv.queue_ids()) == 1


def test_reject_with_text_answers_550_5_7_1_with_that_text(tmp_path):
    with _answering("REJECT not here") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _, reply = _rcpt(srv)
    assert reply == ["550 5.7.1 <u@example.org>: Recipient address rejected: not here"]


def test_reject_without_text_says_access_denied(tmp_path):
    with _answering("REJECT") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _, reply = _rcpt(srv)
    assert reply == ["550 5.7.1 <u@example.org>: Recipient address rejected: Access denied"]


def test_defer_answers_450_4_7_1(tmp_path):
    with _answering("DEFER busy") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _, reply = _rcpt(srv)
    assert reply == ["450 4.7.1 <u@example.org>: Recipient address rejected: busy"]


def test_defer_if_permit_answers_450_when_nothing_later_refuses(tmp_path):
    with _answering("DEFER_IF_PERMIT greylisted") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _, reply = _rcpt(srv)
    assert reply == ["450 4.7.1 <u@example.org>: Recipient address rejected: greylisted"]


def test_defer_if_reject_alone_accepts(tmp_path):
    with _answering("DEFER_IF_REJECT maybe") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _, reply = _rcpt(srv)
    assert reply[0].startswith("250")


class _LaterRefusal(Check):
    """Stands at the verify position, after the policy service."""

    name = "verify"
    stages = frozenset(("rcpt",))

    def __init__(self, reply):
        self.reply = reply

    def check(self, stage, view, outcome):
        return self.reply


def _later(reply):
    def factory(smtpd, config, resources):
        return [_LaterRefusal(reply)]
    return factory


@pytest.fixture
def later_check(monkeypatch):
    def install(reply):
        monkeypatch.setattr(sys.modules[__name__], "later_factory", _later(reply), raising=False)
        monkeypatch.setitem(chain_mod.FACTORIES, "verify", ["%s:later_factory" % __name__])
    return install


def test_defer_if_reject_turns_a_later_5xx_into_450(tmp_path, later_check):
    later_check(Reply(550, "5.1.1", "no such user"))
    with _answering("DEFER_IF_REJECT not sure") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _, reply = _rcpt(srv)
    assert reply == ["450 4.7.1 <u@example.org>: Recipient address rejected: not sure"]


def test_defer_if_permit_yields_to_a_later_refusal(tmp_path, later_check):
    later_check(Reply(550, "5.1.1", "no such user"))
    with _answering("DEFER_IF_PERMIT greylisted") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _, reply = _rcpt(srv)
    assert reply == ["550 5.1.1 no such user"]


@pytest.mark.parametrize("action, expected", [
    ("554 5.7.2 go away", "554 5.7.2 <u@example.org>: Recipient address rejected: go away"),
    ("550 go away", "550 5.7.1 <u@example.org>: Recipient address rejected: go away"),
    ("421 4.3.2 closing", "421 4.3.2 <u@example.org>: Recipient address rejected: closing"),
    ("452 later", "452 4.7.1 <u@example.org>: Recipient address rejected: later"),
    ("550 4.1.1 mismatched class", "550 5.7.1 <u@example.org>: Recipient address rejected: 4.1.1 mismatched class"),
])
def test_numeric_answers_are_sent_with_an_enhanced_code(tmp_path, action, expected):
    with _answering(action) as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _, reply = _rcpt(srv)
    assert reply == [expected]


def test_prepend_puts_the_header_above_our_received_header(tmp_path):
    with _answering("PREPEND X-Policy: checked by test") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        c, reply = _rcpt(srv)
        assert reply[0].startswith("250")
        assert _send(c)[0].startswith("250")
        body = srv.body(srv.queue_ids()[0])
    assert body.startswith(b"X-Policy: checked by test\r\nReceived: from client.test")


def test_prepend_of_a_malformed_header_answers_451_4_3_5(tmp_path):
    with _answering("PREPEND no colon here") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _, reply = _rcpt(srv)
    assert reply[0].startswith("451 4.3.5")


@pytest.mark.parametrize("action, level", [("WARN suspicious", logging.WARNING), ("INFO noted", logging.INFO)])
def test_warn_and_info_are_logged_and_accept(tmp_path, caplog, action, level):
    with caplog.at_level(logging.INFO, logger="pmaster.policy"):
        with _answering(action) as ps, _smtpd(tmp_path, _inet(ps)) as srv:
            _, reply = _rcpt(srv)
    assert reply[0].startswith("250")
    assert any(r.levelno == level and action.split(" ", 1)[1] in r.getMessage() for r in caplog.records)


def test_hold_accepts_and_stores_the_message_on_hold(tmp_path):
    with _answering("HOLD look at it") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        c, reply = _rcpt(srv)
        assert reply[0].startswith("250")
        assert _send(c)[0].startswith("250")
        qid = srv.queue_ids()[0]
        assert srv.envelope(qid)["held"] is True


def test_discard_answers_250_and_stores_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        with _answering("DISCARD spam") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
            c, reply = _rcpt(srv)
            assert reply[0].startswith("250")
            assert _send(c)[0].startswith("250 2.0.0 Ok: queued as")
            assert srv.queue_ids() == []
    assert "discard: END-OF-MESSAGE" in caplog.text and "spam" in caplog.text


@pytest.mark.parametrize("action", ["FILTER smtp:[127.0.0.1]:10025", "REDIRECT a@b", "250 fine", "PERMIT", ""])
def test_any_other_answer_is_451_4_3_5(tmp_path, action):
    with _answering(action) as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _, reply = _rcpt(srv)
    assert reply[0].startswith("451 4.3.5")


@pytest.mark.parametrize("raw", [b"garbage without equals\n\n", b"result=OK\n\n", b"\x00\x01\x02\n\n",
                                 b"action=OK\n" + b"x=" + b"y" * 20000 + b"\n\n"])
def test_a_garbled_answer_fails_closed_and_the_daemon_keeps_serving(tmp_path, raw):
    with PolicyServer(lambda attrs: raw) as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _, reply = _rcpt(srv)
        assert reply[0].startswith("451 4.3.0")
        ps.answer = lambda attrs: action_answer("DUNNO")
        _, again = _rcpt(srv)
        assert again[0].startswith("250")


def test_a_service_that_hangs_times_out_with_451_4_3_0(tmp_path):
    with PolicyServer(lambda attrs: HANG) as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        started = time.monotonic()
        _, reply = _rcpt(srv)
        assert reply[0].startswith("451 4.3.0")
        assert 1.5 < time.monotonic() - started < 10


def test_a_service_that_closes_mid_answer_fails_closed(tmp_path):
    with PolicyServer(lambda attrs: CLOSE_AFTER + b"action=DU") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        started = time.monotonic()
        _, reply = _rcpt(srv)
        assert reply[0].startswith("451 4.3.0")
        assert time.monotonic() - started < 1.5  # the close answers at once, not the timeout


def test_a_service_that_closes_without_answering_fails_closed(tmp_path):
    with PolicyServer(lambda attrs: CLOSE) as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _, reply = _rcpt(srv)
    assert reply[0].startswith("451 4.3.0")


def test_an_unreachable_service_fails_closed(tmp_path):
    with _smtpd(tmp_path, "inet:127.0.0.1:%d" % free_port()) as srv:
        _, reply = _rcpt(srv)
    assert reply[0].startswith("451 4.3.0")


def test_the_connection_is_kept_for_later_requests(tmp_path):
    with _answering("DUNNO") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        for _ in range(3):
            c, reply = _rcpt(srv)
            assert reply[0].startswith("250")
            c.close()
        assert len(ps.requests) == 3
        assert ps.connections == 1


def test_a_kept_connection_the_service_closed_is_replaced_silently(tmp_path):
    with _answering("DUNNO") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        _rcpt(srv)
        ps.drop_idle()
        _, reply = _rcpt(srv)
        assert reply[0].startswith("250")
        assert ps.connections == 2


def test_unix_socket_service(tmp_path):
    import socketserver

    from pmaster.tests import policyserver

    path = str(tmp_path / "policy.sock")

    class _Unix(socketserver.ThreadingUnixStreamServer):
        daemon_threads = True

    ps = PolicyServer(lambda attrs: action_answer("REJECT via unix"))
    unix = _Unix(path, policyserver._Handler)
    unix.owner = ps
    import threading

    t = threading.Thread(target=unix.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        with _smtpd(tmp_path, "unix:" + path) as srv:
            _, reply = _rcpt(srv)
    finally:
        ps.closing.set()
        unix.shutdown()
        unix.server_close()
    assert reply == ["550 5.7.1 <u@example.org>: Recipient address rejected: via unix"]


def test_answers_and_latency_are_counted(tmp_path):
    with _answering("REJECT no") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
        metrics = Metrics()
        srv.runtime.metrics = metrics
        _rcpt(srv)
        _rcpt(srv)
    value = metrics.registry.get_sample_value
    assert value("pmaster_policy_service_answers_total", {"action": "reject"}) == 2
    assert value("pmaster_policy_service_duration_seconds_count") == 2
    assert value("pmaster_smtpd_rejections_total", {"listener": "test", "reason": "policy_service"}) == 2


def test_refusal_is_one_log_line_in_the_spec_form(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        with _answering("REJECT no") as ps, _smtpd(tmp_path, _inet(ps)) as srv:
            _rcpt(srv)
    lines = [r.getMessage() for r in caplog.records if "reject:" in r.getMessage()]
    assert lines == ["reject: RCPT from [127.0.0.1]: 550 5.7.1 <u@example.org>: Recipient address rejected: no; "
                     "from=<s@sender.test> to=<u@example.org> helo=<client.test>"]


# -- exec:

PROGRAM = textwrap.dedent("""\
    import sys
    # answers REJECT with its pid; with --once it exits after one answer
    once = "--once" in sys.argv
    buf = []
    for line in sys.stdin:
        line = line.rstrip("\\n")
        if line:
            buf.append(line)
            continue
        sys.stdout.write("action=REJECT pid %d\\n\\n" % __import__("os").getpid())
        sys.stdout.flush()
        sys.stderr.write("answered\\n")
        sys.stderr.flush()
        if once:
            break
""")


def _program(tmp_path, *args):
    path = tmp_path / "policy_prog.py"
    path.write_text(PROGRAM)
    return "exec:%s %s %s" % (sys.executable, path, " ".join(args))


def _pid_of(reply):
    return int(reply[0].rsplit(" ", 1)[1])


def test_exec_program_answers_and_is_kept_running(tmp_path):
    with _smtpd(tmp_path, _program(tmp_path)) as srv:
        _, first = _rcpt(srv)
        _, second = _rcpt(srv)
    assert first[0].startswith("550 5.7.1")
    assert _pid_of(first) == _pid_of(second)


def test_exec_program_that_exits_is_started_again(tmp_path):
    with _smtpd(tmp_path, _program(tmp_path, "--once")) as srv:
        _, first = _rcpt(srv)
        wait_until(lambda: not os.path.exists("/proc/%d/cmdline" % _pid_of(first))
                   or open("/proc/%d/stat" % _pid_of(first)).read().split(") ")[1].startswith("Z"),
                   what="the program to exit")
        _, second = _rcpt(srv)
    assert second[0].startswith("550 5.7.1")
    assert _pid_of(first) != _pid_of(second)


def test_exec_program_stderr_goes_to_the_log(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pmaster.policy"):
        with _smtpd(tmp_path, _program(tmp_path)) as srv:
            _rcpt(srv)
            wait_until(lambda: "answered" in caplog.text, what="stderr in the log")


def test_exec_program_that_does_not_exist_fails_closed(tmp_path):
    with _smtpd(tmp_path, "exec:%s" % (tmp_path / "missing-program")) as srv:
        _, reply = _rcpt(srv)
    assert reply[0].startswith("451 4.3.0")


def test_exec_programs_end_when_the_listener_resources_close(tmp_path):
    with _smtpd(tmp_path, _program(tmp_path)) as srv:
        _, reply = _rcpt(srv)
        pid = _pid_of(reply)
        srv.runtime.resources.close()
        wait_until(lambda: not os.path.exists("/proc/%d" % pid)
                   or open("/proc/%d/stat" % pid).read().split(") ")[1].startswith("Z"), what="the program to end")


def test_a_reload_naming_the_same_service_keeps_the_running_program(tmp_path):
    with _smtpd(tmp_path, _program(tmp_path)) as srv:
        _, first = _rcpt(srv)
        srv.runtime.reload(srv.config)
        _, second = _rcpt(srv)
    assert _pid_of(first) == _pid_of(second)


def test_a_reload_without_the_service_ends_its_program(tmp_path):
    from pmaster.config import load

    with _smtpd(tmp_path, _program(tmp_path)) as srv:
        _, first = _rcpt(srv)
        pid = _pid_of(first)
        plain = tmp_path / "plain.cf"
        plain.write_text(open(srv.config_path).read().replace("policy-service =", "# policy-service ="))
        srv.runtime.reload(load(str(plain)))
        wait_until(lambda: not os.path.exists("/proc/%d" % pid)
                   or open("/proc/%d/stat" % pid).read().split(") ")[1].startswith("Z"), what="the program to end")
        _, reply = _rcpt(srv)
    assert reply[0].startswith("250")


def test_exec_program_that_never_answers_times_out_and_is_replaced(tmp_path):
    hang = tmp_path / "hang.py"
    hang.write_text("import sys, time\nfor line in sys.stdin:\n    if not line.strip():\n        time.sleep(60)\n")
    with _smtpd(tmp_path, "exec:%s %s" % (sys.executable, hang)) as srv:
        _, reply = _rcpt(srv)
        assert reply[0].startswith("451 4.3.0")
        client = next(iter(srv.runtime.resources._objects.values()))
        assert client._idle == [] and client._busy == 0  # the hung copy is not kept
