"""Pipe mailer: argv expansion, no shell injection, streamed stdin, sysexits, timeouts, running as a user."""

import hashlib
import os
import pwd
import sys
import time
import tracemalloc

import pytest

from pmaster.config import Config, PipeConfig
from pmaster.envelope import Envelope, Recipient
from pmaster.mailers import OK, PERMFAIL, TEMPFAIL, Delivery, pipe
from pmaster.mailers.pipe import classify, deliver, expand_argv
from pmaster.spool import record_trailer

BODY = b"Subject: test\r\nFrom: a@example.org\r\n\r\nline one\r\nline two\r\n"


def rcpt(address, extension=""):
    return Recipient(address=address, original=address, mailer="pipe", target="t", extension=extension)


def make_delivery(tmp_path, sender="alice@example.org", addresses=("bob@example.com",), body=BODY,
                  deadline=None, recipients=None):
    rcpts = recipients if recipients is not None else [rcpt(a) for a in addresses]
    env = Envelope(queue_id="Q123", sender=sender, recipients=rcpts, arrival=time.time())
    body_path = tmp_path / "body"
    body_path.write_bytes(body + record_trailer(len(body), env))  # a spool record, as the scheduler passes
    return Delivery(queue_id="Q123", envelope=env, recipients=rcpts, body_path=str(body_path),
                    config=Config(path=str(tmp_path / "test.cf")), deadline=deadline)


def section(*words, **kw):
    return PipeConfig(ident="test", exec=tuple(words), **kw)


def script(tmp_path, text, name="prog.sh"):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return str(path)


def other_user():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return next(p for p in pwd.getpwall() if p.pw_uid != 0)


def gone_or_zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# --- argv expansion (pure) ---

def test_expand_argv_substitutes_inside_words():
    argv = expand_argv(["-f", "${MAIL_FROM}", "--id=${QUEUE_ID}", "${RCPT_TO}", "x-${RCPT_DOMAIN}-${EXTENSION}"],
                       "s@a.org", [rcpt("joe@B.example", "news")], "Q1")
    assert argv == ["-f", "s@a.org", "--id=Q1", "joe@B.example", "x-b.example-news"]


def test_expand_argv_whole_word_rcpt_to_gives_one_word_per_recipient():
    rcpts = [rcpt("a@x.org", "e1"), rcpt("b@y.org"), rcpt("c@z.org", "e3")]
    argv = expand_argv(["deliver", "${RCPT_TO}", "--", "${RCPT_DOMAIN}", "${EXTENSION}"], "", rcpts, "Q")
    assert argv == ["deliver", "a@x.org", "b@y.org", "c@z.org", "--", "x.org", "y.org", "z.org", "e1", "", "e3"]


def test_expand_argv_longer_word_uses_first_recipient():
    argv = expand_argv(["to=${RCPT_TO}"], "", [rcpt("a@x.org"), rcpt("b@x.org")], "Q")
    assert argv == ["to=a@x.org"]


def test_expand_argv_null_sender_is_empty_word():
    assert expand_argv(["-f", "${MAIL_FROM}"], "", ["u@x.org"], "Q") == ["-f", ""]


def test_expand_argv_does_not_expand_values_again():
    argv = expand_argv(["${MAIL_FROM}", "${UNKNOWN}"], "${QUEUE_ID}@x.org", ["u@x.org"], "Q")
    assert argv == ["${QUEUE_ID}@x.org", "${UNKNOWN}"]


def test_expand_argv_accepts_plain_addresses():
    assert expand_argv(["${RCPT_TO}", "${RCPT_DOMAIN}"], "", ["u@X.org"], "Q") == ["u@X.org", "x.org"]


# --- exit status reading (pure) ---

@pytest.mark.parametrize("code,status,dsn", [
    (0, OK, "2.0.0"), (71, TEMPFAIL, "4.3.0"), (74, TEMPFAIL, "4.3.0"), (75, TEMPFAIL, "4.3.0"),
    (78, TEMPFAIL, "4.3.0"), (126, TEMPFAIL, "4.3.0"), (127, TEMPFAIL, "4.3.0"), (-9, TEMPFAIL, "4.3.0"),
    (67, PERMFAIL, "5.1.1"), (68, PERMFAIL, "5.1.2"), (77, PERMFAIL, "5.7.1"), (69, PERMFAIL, "5.3.0"),
    (65, PERMFAIL, "5.6.0"), (1, PERMFAIL, "5.3.0"), (64, PERMFAIL, "5.3.0"),
])
def test_classify_follows_sysexits(code, status, dsn):
    result = classify(code, "why")
    assert (result.status, result.dsn_status) == (status, dsn)


# --- [pipe] sections ---

def test_rcpt_to_word_runs_once_with_every_recipient(tmp_path):
    out = tmp_path / "out"
    prog = script(tmp_path, 'for a in "$@"; do echo "$a" >> "%s"; done\necho run >> "%s.runs"\n' % (out, out))
    delivery = make_delivery(tmp_path, addresses=("a@x.org", "b@x.org", "c@y.org"))
    results = deliver(delivery, section(prog, "${RCPT_TO}"), None)
    assert [r.status for r in results] == [OK, OK, OK]
    assert out.read_text().split() == ["a@x.org", "b@x.org", "c@y.org"]
    assert (tmp_path / "out.runs").read_text() == "run\n"


def test_pipe_section_never_runs_sender_through_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    sender = "$(touch %s)`touch %s`;touch %s;@x.org" % (marker, marker, marker)
    out = tmp_path / "args"
    prog = script(tmp_path, 'printf "%%s\\n" "$@" > "%s"\n' % out)
    results = deliver(make_delivery(tmp_path, sender=sender), section(prog, "${MAIL_FROM}", "f=${MAIL_FROM}"), None)
    assert results[0].status == OK
    assert not marker.exists()
    assert out.read_text() == "%s\nf=%s\n" % (sender, sender)


def test_inline_pipe_never_pastes_sender_into_command(tmp_path):
    marker = tmp_path / "pwned"
    sender = "$(touch %s)`touch %s`;touch %s;@x.org" % (marker, marker, marker)
    out = tmp_path / "from"
    results = deliver(make_delivery(tmp_path, sender=sender), None, 'printf "%%s" "$MAIL_FROM" > "%s"' % out)
    assert results[0].status == OK
    assert not marker.exists()
    assert out.read_text() == sender


def test_inline_pipe_gets_envelope_and_minimal_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PMASTER_TEST_SECRET", "leak")
    out = tmp_path / "env"
    rcpts = [rcpt("joe@A.example", "news"), rcpt("ann@b.example")]
    delivery = make_delivery(tmp_path, recipients=rcpts)
    results = deliver(delivery, None, 'env > "%s"' % out)
    assert [r.status for r in results] == [OK, OK]
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert env["MAIL_FROM"] == "alice@example.org"
    assert env["RCPT_TO"] == "joe@A.example ann@b.example"
    assert env["QUEUE_ID"] == "Q123"
    assert env["RCPT_DOMAIN"] == "a.example b.example"
    assert env["EXTENSION"] == "news "
    assert (env["PATH"], env["HOME"], env["SHELL"]) == (pipe.SAFE_PATH, "/", "/bin/sh")
    assert env["PATH"].endswith("/usr/bin:/bin")
    assert "PMASTER_TEST_SECRET" not in env


def test_stdin_gets_return_path_and_lf_line_ends(tmp_path):
    out = tmp_path / "msg"
    results = deliver(make_delivery(tmp_path, sender="s@x.org"), section("/bin/sh", "-c", 'cat > "$1"', "sh", str(out)),
                      None)
    assert results[0].status == OK
    assert out.read_bytes() == b"Return-Path: <s@x.org>\n" + BODY.replace(b"\r\n", b"\n")


def test_null_sender_gets_empty_return_path(tmp_path):
    out = tmp_path / "msg"
    deliver(make_delivery(tmp_path, sender=""), None, 'cat > "%s"' % out)
    assert out.read_bytes().startswith(b"Return-Path: <>\nSubject: test\n")


def test_crlf_split_across_read_chunks_becomes_lf(tmp_path):
    head = b"X-Pad: " + b"a" * (pipe.CHUNK - 9) + b"\r"  # the CR ends the first chunk, its LF starts the next
    body = head + b"\n\r\nbare\rcr\r\n"
    out = tmp_path / "msg"
    deliver(make_delivery(tmp_path, sender="", body=body), section("/bin/sh", "-c", 'cat > "$1"', "sh", str(out)), None)
    assert out.read_bytes() == b"Return-Path: <>\n" + head[:-1] + b"\n\nbare\rcr\n"


def test_exit_75_is_tempfail(tmp_path):
    prog = script(tmp_path, "echo 'mailbox busy' >&2\nexit 75\n")
    result = deliver(make_delivery(tmp_path), section(prog), None)[0]
    assert (result.status, result.reply, result.dsn_status) == (TEMPFAIL, "exit 75: mailbox busy", "4.3.0")


def test_exit_67_is_permfail_with_first_stderr_line(tmp_path):
    prog = script(tmp_path, "echo >&2\necho '  no such user: bob  ' >&2\necho second >&2\nexit 67\n")
    result = deliver(make_delivery(tmp_path), section(prog), None)[0]
    assert (result.status, result.reply, result.dsn_status) == (PERMFAIL, "exit 67: no such user: bob", "5.1.1")


def test_exit_127_is_tempfail(tmp_path):
    result = deliver(make_delivery(tmp_path), None, "/nonexistent/program")[0]
    assert result.status == TEMPFAIL
    assert result.reply.startswith("exit 127")


def test_missing_program_is_tempfail(tmp_path):
    result = deliver(make_delivery(tmp_path), section("/nonexistent/program", "${RCPT_TO}"), None)[0]
    assert result.status == TEMPFAIL
    assert "cannot execute /nonexistent/program" in result.reply


def test_killed_by_signal_is_tempfail(tmp_path):
    result = deliver(make_delivery(tmp_path), None, "kill -9 $$")[0]
    assert result.status == TEMPFAIL
    assert result.reply == "killed by signal SIGKILL"


def test_every_recipient_gets_the_batch_result(tmp_path):
    results = deliver(make_delivery(tmp_path, addresses=("a@x.org", "b@x.org", "c@x.org")), None, "exit 67")
    assert len(results) == 3 and len(set(results)) == 1 and results[0].status == PERMFAIL


def test_child_that_ignores_stdin_is_judged_by_exit_status(tmp_path):
    body = b"Subject: big\r\n\r\n" + b"y" * 78 * 20000 + b"\r\n"
    assert deliver(make_delivery(tmp_path, body=body), section("/bin/true"), None)[0].status == OK
    assert deliver(make_delivery(tmp_path, body=body), None, "exit 75")[0].status == TEMPFAIL


def test_large_stderr_is_drained_and_bounded(tmp_path):
    prog = script(tmp_path, "echo 'first line' >&2\nhead -c 2000000 /dev/zero | tr '\\0' x >&2\nexit 69\n")
    result = deliver(make_delivery(tmp_path), section(prog), None)[0]
    assert (result.status, result.reply, result.dsn_status) == (PERMFAIL, "exit 69: first line", "5.3.0")


def test_timeout_kills_the_whole_process_group(tmp_path):
    pids = tmp_path / "pids"
    prog = script(tmp_path, 'sleep 100 & echo $! > "%s"\nsleep 100\n' % pids)
    started = time.monotonic()
    result = deliver(make_delivery(tmp_path), section(prog, timeout=1), None)[0]
    assert time.monotonic() - started < 10
    assert (result.status, result.reply) == (TEMPFAIL, "timeout")
    grandchild = int(pids.read_text())
    deadline = time.monotonic() + 5
    while not gone_or_zombie(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone_or_zombie(grandchild)


def test_delivery_deadline_stops_the_child(tmp_path):
    delivery = make_delivery(tmp_path, deadline=time.monotonic() + 0.5)
    started = time.monotonic()
    result = deliver(delivery, None, "sleep 100")[0]
    assert (result.status, result.reply) == (TEMPFAIL, "timeout")
    assert time.monotonic() - started < 5


def test_background_grandchild_holding_pipes_does_not_block(tmp_path):
    pids = tmp_path / "pids"
    started = time.monotonic()
    result = deliver(make_delivery(tmp_path), None, 'sleep 30 & echo $! > "%s"; exit 0' % pids)[0]
    elapsed = time.monotonic() - started
    os.kill(int(pids.read_text()), 9)
    assert result.status == OK
    assert elapsed < 5


def test_twenty_mib_body_is_streamed_with_bounded_memory(tmp_path):
    line = b"z" * 78 + b"\r\n"
    count = 20 * 1024 * 1024 // len(line) + 1
    digest = hashlib.sha256(b"Return-Path: <s@x.org>\n")
    body_path = tmp_path / "big-body"
    with open(body_path, "wb") as f:
        f.write(BODY)
        digest.update(BODY.replace(b"\r\n", b"\n"))
        for _ in range(count // 1000):
            f.write(line * 1000)
            digest.update(line.replace(b"\r\n", b"\n") * 1000)
    delivery = make_delivery(tmp_path, sender="s@x.org", body=b"")
    with open(body_path, "ab") as f:
        f.write(record_trailer(os.path.getsize(body_path), delivery.envelope))
    delivery.body_path = str(body_path)
    out = tmp_path / "received"
    tracemalloc.start()
    try:
        result = deliver(delivery, section("/bin/sh", "-c", 'cat > "$1"', "sh", str(out)), None)[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.status == OK
    assert os.path.getsize(body_path) > 20 * 1000 * 1000
    with open(out, "rb") as f:
        received = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            received.update(block)
    assert received.hexdigest() == digest.hexdigest()
    assert peak < 2 * 1024 * 1024


def test_unreadable_spool_body_is_tempfail(tmp_path):
    delivery = make_delivery(tmp_path)
    delivery.body_path = str(tmp_path / "missing")
    result = deliver(delivery, None, "cat")[0]
    assert result.status == TEMPFAIL and "cannot read queued message" in result.reply


def test_runs_as_configured_user(tmp_path):
    user = other_user()
    groups = sorted(os.getgrouplist(user.pw_name, user.pw_gid))
    prog = section("/bin/sh", "-c", 'echo "$(id -u) $(id -g) $(id -G | tr " " "\\n" | sort -n | xargs)" >&2; exit 67',
                   user=user.pw_name)
    result = deliver(make_delivery(tmp_path), prog, None)[0]
    expected = "%d %d %s" % (user.pw_uid, user.pw_gid, " ".join(str(g) for g in groups))
    assert result.reply == "exit 67: " + expected


def test_user_with_missing_program_is_tempfail(tmp_path):
    result = deliver(make_delivery(tmp_path), section("/nonexistent/prog", user=other_user().pw_name), None)[0]
    assert result.status == TEMPFAIL
    assert result.reply.startswith("exit 127")


def test_unknown_user_is_tempfail(tmp_path):
    result = deliver(make_delivery(tmp_path), section("/bin/true", user="no-such-user-pmaster"), None)[0]
    assert (result.status, result.reply) == (TEMPFAIL, "pipe user no-such-user-pmaster: no such user")


def test_user_without_root_is_tempfail(tmp_path, monkeypatch):
    monkeypatch.setattr(pipe.os, "geteuid", lambda: 1000)
    result = deliver(make_delivery(tmp_path), section("/bin/true", user="nobody"), None)[0]
    assert result.status == TEMPFAIL
    assert "must run as root" in result.reply


def test_child_that_closes_stderr_still_gets_all_of_stdin(tmp_path):
    out = tmp_path / "msg"
    body = BODY + b"x" * 1000000 + b"\r\n"
    started = time.monotonic()
    result = deliver(make_delivery(tmp_path, sender="", body=body), None, 'exec 2>&-; cat > "%s"' % out)[0]
    assert result.status == OK
    assert out.read_bytes() == b"Return-Path: <>\n" + body.replace(b"\r\n", b"\n")
    assert time.monotonic() - started < 5


def test_return_path_goes_to_the_child_with_the_first_chunk():
    import io
    feeder = pipe._Feeder(io.BytesIO(b"Subject: x\r\n\r\nhi\r\n"), "s@x.org")
    assert feeder.next_bytes() == b"Return-Path: <s@x.org>\nSubject: x\n\nhi\n"  # one write for a small message
    feeder.consumed(len(feeder.next_bytes()))
    assert feeder.next_bytes() == b""


def test_child_gets_the_pipes_and_dev_null_and_nothing_else(tmp_path):
    out = tmp_path / "fds"
    code = ("import os, sys\nfds = {}\nfor f in os.listdir('/proc/self/fd'):\n"
            "    try:\n        fds[int(f)] = os.readlink('/proc/self/fd/' + f)\n"
            "    except OSError:\n        pass  # the listing's own descriptor, closed by now\n"
            "open(sys.argv[1], 'w').write(repr(fds))\n")
    result = deliver(make_delivery(tmp_path), section(sys.executable, "-c", code, str(out)), None)[0]
    assert result.status == OK, result.reply
    fds = {fd: target for fd, target in eval(out.read_text()).items() if not target.startswith("/proc/")}
    assert sorted(fds) == [0, 1, 2], fds  # the daemon's own descriptors stay behind
    assert fds[1] == "/dev/null"
    assert fds[0].startswith("pipe:") and fds[2].startswith("pipe:") and fds[0] != fds[2]


def test_deliveries_leave_no_descriptor_behind(tmp_path):
    deliver(make_delivery(tmp_path), None, "cat > /dev/null")  # opens the shared /dev/null descriptor once
    before = len(os.listdir("/proc/self/fd"))
    for command in ("cat > /dev/null", "exit 67", "echo oops >&2; exit 75", "kill -9 $$", "exec 0<&-; exit 0"):
        deliver(make_delivery(tmp_path), None, command)
    deliver(make_delivery(tmp_path), section("/nonexistent/program"), None)
    assert len(os.listdir("/proc/self/fd")) == before


def test_exit_is_noticed_while_a_grandchild_keeps_stderr_busy(tmp_path):
    started = time.monotonic()
    result = deliver(make_delivery(tmp_path), section("/bin/sh", "-c", "cat > /dev/null; (yes >&2 &); exit 0",
                                                     timeout=20), None)[0]
    assert result.status == OK  # not a timeout: the message was delivered and must not be delivered again
    assert time.monotonic() - started < 10


def test_lone_cr_read_at_the_end_of_a_large_body_is_kept():
    import io
    body = b"a" * pipe.CHUNK + b"\r"  # the last read returns just the CR
    feeder = pipe._Feeder(io.BytesIO(body), "")
    out = b""
    for _ in range(10):
        data = feeder.next_bytes()
        if not data:
            break
        out += data
        feeder.consumed(len(data))
    assert out == b"Return-Path: <>\n" + b"a" * pipe.CHUNK + b"\r"
