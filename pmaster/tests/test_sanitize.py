"""Issue 17 item 10: remote texts lose their controls before the log and ``last_reply``; HELO and addresses
with C1 controls, line separators or bidi controls are refused (501)."""

import os
import subprocess
import sys
import time

import pytest

from pmaster.envelope import Envelope, Recipient
from pmaster.grammar.smtp import SmtpSyntaxError, parse_command
from pmaster.sanitize import MAX_TEXT, has_unsafe, remote_text
from pmaster.spool import Spool
from pmaster.tests.daemon_fixture import REPO, DaemonProcess, InProcessSmtpd, wait_until
from pmaster.tests.smtpsink import SmtpSink

# What the review used: a CR to return to the line start, an ANSI erase, a forged log line, BEL, RLO.
FORGED = "busy\r2026-12-08 pmaster.scheduler: QUEUE: to=<x@y> status=sent\x1b[2K\x07\u202eevil"
CONTROLS = ["\r", "\n", "\x1b", "\x07", "\x00", "\x7f", "\x85", "\x9b", "\u2028", "\u2029", "\u202e", "\u2066",
            "\u200f", "\u061c"]


def assert_clean(text: str) -> None:
    for c in CONTROLS:
        assert c not in text, (c, text)


@pytest.mark.parametrize("control", CONTROLS)
def test_remote_text_removes_each_control(control):
    assert_clean(remote_text("a%sb" % control))


def test_remote_text_keeps_printable_utf8():
    assert remote_text("550 5.1.1 Benutzer unbekannt: Jörg 日本") == "550 5.1.1 Benutzer unbekannt: Jörg 日本"


def test_remote_text_turns_line_breaks_into_spaces_and_controls_into_question_marks():
    assert remote_text("a\r\nb\tc\x1b[31md\x07") == "a  b c?[31md?"


def test_remote_text_is_bounded():
    assert len(remote_text("x" * (MAX_TEXT * 10))) == MAX_TEXT + 3


def test_has_unsafe_spares_plain_text_and_c0_is_left_to_the_grammar():
    assert not has_unsafe("jörg@example.org") and has_unsafe("a\u202eb") and has_unsafe("a\x85b")


@pytest.mark.parametrize("char", ["\x85", "\x9b", "\u2028", "\u2029", "\u202e", "\u2067"])
def test_helo_with_unsafe_character_is_501(char):
    with pytest.raises(SmtpSyntaxError) as err:
        parse_command("EHLO mx%s.example.org" % char)
    assert (err.value.reply.code, err.value.reply.enhanced) == (501, "5.5.4")


@pytest.mark.parametrize("char", ["\x85", "\u2028", "\u202e", "\u200f"])
def test_sender_with_unsafe_character_is_501_5_1_7(char):
    with pytest.raises(SmtpSyntaxError) as err:
        parse_command("MAIL FROM:<jo%se@example.org>" % char)
    assert (err.value.reply.code, err.value.reply.enhanced) == (501, "5.1.7")


@pytest.mark.parametrize("char", ["\x9b", "\u2029", "\u202d", "\u2069"])
def test_recipient_with_unsafe_character_is_501_5_1_3(char):
    with pytest.raises(SmtpSyntaxError) as err:
        parse_command("RCPT TO:<bob@exa%smple.org>" % char)
    assert (err.value.reply.code, err.value.reply.enhanced) == (501, "5.1.3")


def test_utf8_address_without_controls_is_still_accepted():
    assert parse_command("RCPT TO:<jörg@example.org>").address == "jörg@example.org"


def test_session_refuses_bidi_override_in_helo_and_recipient(tmp_path):
    with InProcessSmtpd(tmp_path) as server:
        c = server.client()
        assert c.cmd("EHLO evil\u202egro.elpmaxe")[-1].startswith("501 5.5.4")
        assert c.cmd("EHLO client.example.org")[0].startswith("250")
        assert c.cmd("MAIL FROM:<a@example.org>")[0].startswith("250")
        assert c.cmd("RCPT TO:<joe\u2028@example.org>")[0].startswith("501 5.1.3")
        c.close()


def test_relay_reply_with_controls_is_stored_and_logged_clean(tmp_path):
    with SmtpSink(rcpt_replies={"bob@x.test": "450 4.2.0 " + FORGED}) as sink:
        d = DaemonProcess(tmp_path, "[core]\n  hostname = mx.test\n  spool-directory = {spool}\n"
                          "  pid-file = {tmp}/run/pm.pid\n  retry-min = 1m\n  retry-max = 2m\n"
                          "[smtpd test]\n  listen-port = 127.0.0.1:{port}\n"
                          "[route]\n  @x.test relay(127.0.0.1:%d)\n" % sink.port)
        d.start()
        try:
            with d.smtp() as s:
                s.sendmail("a@example.org", ["bob@x.test"], "Subject: t\r\n\r\nhello\r\n")
            qid = d.queue_ids()[0]
            wait_until(lambda: d.envelope(qid)["recipients"][0]["attempts"] >= 1, 15, "the relay attempt")
            wait_until(lambda: "%s: to=<bob@x.test>" % qid in d.log_text(), 10, "the result's log line")
            last = d.envelope(qid)["recipients"][0]["last_reply"]
            assert "busy" in last and "evil" in last
            assert_clean(last)
            line = [ln for ln in d.log_text().splitlines() if "%s: to=<bob@x.test>" % qid in ln][0]
            assert "evil" in line
            assert_clean(line)
            # the forged text did not become a line of its own
            assert not any(ln.startswith("2026-12-08 pmaster.scheduler: QUEUE") for ln in d.log_text().splitlines())
        finally:
            d.stop()


def test_pipe_stderr_with_controls_is_stored_clean(tmp_path):
    d = DaemonProcess(tmp_path, "[core]\n  hostname = mx.test\n  spool-directory = {spool}\n"
                      "  pid-file = {tmp}/run/pm.pid\n  retry-min = 1m\n  retry-max = 2m\n"
                      "[pipe noisy]\n  exec = /bin/sh -c \"printf 'no room \\\\302\\\\2332Kforged\\\\342\\\\200\\\\256x\\\\n' >&2; exit 75\"\n"
                      "[smtpd test]\n  listen-port = 127.0.0.1:{port}\n[route]\n  @example.org noisy\n")
    d.start()
    try:
        with d.smtp() as s:
            s.sendmail("a@example.org", ["joe@example.org"], "Subject: t\r\n\r\nhello\r\n")
        qid = d.queue_ids()[0]
        wait_until(lambda: d.envelope(qid)["recipients"][0]["attempts"] >= 1, 15, "the pipe attempt")
        last = d.envelope(qid)["recipients"][0]["last_reply"]
        assert last.startswith("exit 75: no room") and "forged" in last, last
        assert_clean(last)
    finally:
        d.stop()


def queue_cli(tmp_path, *args):
    cf = tmp_path / "pm.cf"
    cf.write_text("[core]\n  spool-directory = spool\n[route]\n  @example.org pipe(cat >/dev/null)\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "pmaster", "queue", "-c", str(cf)] + list(args),
                          capture_output=True, text=True, timeout=30, env=env)


def old_record(tmp_path, last_reply: str, body: bytes) -> str:
    """A record as a version before the fix stored it: the peer's controls still in ``last_reply``."""
    spool = Spool(str(tmp_path / "spool"))
    with spool.writer() as w:
        w.write(body)
        w.commit(Envelope(w.queue_id, "a@example.org", [Recipient("joe@example.org", "joe@example.org", "pipe", "p",
                                                                   attempts=1, last_reply=last_reply)],
                          time.time(), size=len(body)))
    return w.queue_id


def test_queue_list_never_prints_terminal_controls_of_an_old_record(tmp_path):
    qid = old_record(tmp_path, "450 " + FORGED, b"Subject: t\r\n\r\nhello\r\n")
    out = queue_cli(tmp_path, "list")
    assert out.returncode == 0 and qid in out.stdout and "evil" in out.stdout
    assert_clean(out.stdout.replace("\n", ""))


def test_queue_show_never_prints_terminal_controls_of_a_client_header(tmp_path):
    qid = old_record(tmp_path, "", b"Subject: \x1b]0;owned\x07\x1b[2J\xc2\x9b\r\n\r\nhello\r\n")
    out = queue_cli(tmp_path, "show", qid)
    assert out.returncode == 0 and "Subject: ?]0;owned??[2J?" in out.stdout, out.stdout
    assert_clean(out.stdout.replace("\n", ""))
