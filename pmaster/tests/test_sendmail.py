"""``pmaster sendmail`` and the pickup (SPEC 10): real callers' command lines, a real daemon, a real local user."""

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from pmaster.errors import UsageError
from pmaster.submit.sendmail import parse_args
from pmaster.tests.daemon_fixture import REPO, DaemonProcess, wait_for

CONFIG = """\
[core]
  hostname = box.test
  spool-directory = {spool}
  pid-file = {tmp}/run/pmaster.pid
  retry-min = 1s
  retry-max = 2s

[smtpd test]
  name = mx.test
  listen-port = 127.0.0.1:{port}

[route]
  @example.org  pipe(cat > "{tmp}/out/$RCPT_TO.$QUEUE_ID")
  root  pipe(cat > "{tmp}/out/root.$QUEUE_ID")
  {user}  pipe(cat > "{tmp}/out/{user}.$QUEUE_ID")
"""

MESSAGE = b"Subject: test\nTo: to@example.org\nCc: cc@example.org\nBcc: hidden@example.org\n\nline one\n"


@pytest.fixture(scope="module")
def user():
    """An unprivileged local user of our own, removed afterwards."""
    name = "pmst%d" % os.getpid()
    subprocess.run(["useradd", "-M", "-N", "-c", "Test User,,,", "-s", "/bin/sh", name], check=True, timeout=60)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], timeout=60)


@pytest.fixture
def box(user):
    """A daemon configuration in a directory the test user may reach (pytest's tmp_path is root's 0700)."""
    base = tempfile.mkdtemp(prefix="pmsendmail-", dir="/tmp")
    os.chmod(base, 0o711)
    os.makedirs(os.path.join(base, "out"))
    os.chmod(os.path.join(base, "out"), 0o777)
    daemon = DaemonProcess(base, CONFIG, values={"user": user.pw_name}, env={"PMASTER_DRAIN_SECONDS": "2"})
    os.chmod(daemon.config_path, 0o644)
    daemon.user = user
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)


def as_user(user, argv, **kwargs):
    """argv as the unprivileged user. CAP_DAC_READ_SEARCH only lets it read the Python under /root (mode 0700)."""
    prefix = ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid, "--init-groups",
              "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]
    return run(prefix + argv, **kwargs)


def run(argv, input=b"", env=None, timeout=60):
    environ = {k: v for k, v in os.environ.items() if k != "PMASTER_CONFIG"}
    environ["PYTHONPATH"] = REPO
    environ.update(env or {})
    return subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ,
                          timeout=timeout, cwd="/")


def sendmail(box, *args, input=MESSAGE, user=None):
    argv = [sys.executable, "-m", "pmaster", "sendmail", "-C", box.config_path] + list(args)
    return as_user(user, argv, input=input) if user else run(argv, input=input)


def maildrop(box):
    path = os.path.join(box.spool_dir, "maildrop")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def delivered(box, name, timeout=15.0):
    """The message delivered to ``name`` (RCPT_TO), polled for."""
    out = os.path.join(box.tmp, "out")

    def find():
        for f in os.listdir(out):
            if f.startswith(name + ".") and os.path.getsize(os.path.join(out, f)):
                return open(os.path.join(out, f), "rb").read().replace(b"\r\n", b"\n")  # pipes get LF
        return None
    got = wait_for(find, timeout)
    assert got, "nothing delivered to %s; log:\n%s" % (name, box.log_text())
    return got


def header(text: bytes) -> bytes:
    return text.split(b"\n\n", 1)[0]


# -- the command line, parsed


def test_grouped_flags():
    opts = parse_args(["-ti", "root"])
    assert opts.extract and not opts.dot_ends and opts.recipients == ["root"]


def test_glued_arguments():
    opts = parse_args(["-froot", "-FCronDaemon", "-B8BITMIME", "x"])
    assert (opts.sender, opts.full_name, opts.body_type) == ("root", "CronDaemon", "8BITMIME")


def test_separate_arguments():
    opts = parse_args(["-f", "a@b.test", "-F", "Full Name", "x"])
    assert (opts.sender, opts.full_name) == ("a@b.test", "Full Name")


def test_oi_means_i_and_other_o_options_are_ignored():
    opts = parse_args(["-oem", "-odi", "-oi", "-Am", "-L", "tag", "-v", "-n", "x"])
    assert not opts.dot_ends and opts.recipients == ["x"]


def test_double_dash_ends_options():
    assert parse_args(["-oi", "--", "-notanoption@example.org"]).recipients == ["-notanoption@example.org"]


def test_first_non_option_ends_options():
    assert parse_args(["root", "-t"]).recipients == ["root", "-t"] and not parse_args(["root", "-t"]).extract


@pytest.mark.parametrize("argv, message", [
    (["-Z", "x"], "unknown option -Z"),
    (["-f"], "option -f needs an argument"),
    (["-BBINARY", "x"], "7BIT or 8BITMIME"),
    (["-Nsometimes", "x"], "expected never"),
    (["-fa\r\nb", "x"], "CR, LF or NUL"),
])
def test_bad_options_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


# -- real callers' command lines, as an unprivileged user where it matters


def test_debian_cron_command_line_as_user_daemon_stopped_then_started(box):
    # Debian cron (do_command.c): /usr/sbin/sendmail -i -FCronDaemon -B8BITMIME -oem USER
    user = box.user.pw_name
    box.start()
    box.stop()  # the first start made maildrop/; now mail must wait for the next one
    body = b"Subject: Cron <%s@box> true\nTo: %s\n\nok \xc3\xa4\n" % (user.encode(), user.encode())
    proc = sendmail(box, "-i", "-FCronDaemon", "-B8BITMIME", "-oem", user, input=body, user=box.user)
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert len(maildrop(box)) == 1  # waits for the daemon
    box.start()
    got = delivered(box, user)
    assert b"From: CronDaemon <%s@box.test>" % user.encode() in got
    assert b"(Postmaster, from userid %d)" % box.user.pw_uid in got
    assert wait_for(lambda: "uid=%d from=<%s@box.test>" % (box.user.pw_uid, user) in box.log_text(), 10)
    assert wait_for(lambda: not maildrop(box), 5)


def test_cronie_command_line(box):
    # cronie (do_command.c): sendmail -FCronDaemon -i -odi -oem -oi -t -f root
    box.start()
    body = b"To: root\nSubject: Cron <root@box> date\n\nTue Dec  8\n"
    proc = sendmail(box, "-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "root", input=body)
    assert proc.returncode == 0, proc.stderr
    got = delivered(box, "root")
    assert b"Return-Path: <root@box.test>" in got and b"From: CronDaemon <root@box.test>" in got


def test_php_mail_command_line_extracts_recipients_and_drops_bcc(box):
    box.start()
    proc = sendmail(box, "-t", "-i", user=box.user)  # PHP's sendmail_path default: "sendmail -t -i"
    assert proc.returncode == 0, proc.stderr
    for rcpt in ("to@example.org", "cc@example.org", "hidden@example.org"):
        got = delivered(box, rcpt)
        assert b"Bcc" not in header(got) and b"hidden" not in header(got)
    assert b"Message-ID: <" in header(got) and b"\nDate: " in header(got)


def test_git_send_email_command_line(box):
    box.start()
    body = b"From: Dev <dev@example.org>\nTo: list@example.org\nSubject: [PATCH] x\n\n.\n-- \n2.39\n"
    proc = sendmail(box, "-i", "list@example.org", "dev@example.org", input=body, user=box.user)
    assert proc.returncode == 0, proc.stderr
    got = delivered(box, "list@example.org")
    assert got.endswith(b"\n.\n-- \n2.39\n")  # -i: a lone dot is text
    assert b"From: Dev <dev@example.org>" in got and got.count(b"From: ") == 1


def test_git_send_email_with_envelope_sender(box):
    box.start()
    proc = sendmail(box, "-i", "-f", "dev@example.org", "list@example.org", input=b"Subject: p\n\nx\n")
    assert proc.returncode == 0, proc.stderr
    assert b"Return-Path: <dev@example.org>" in delivered(box, "list@example.org")


def test_mutt_command_line(box):
    box.start()
    proc = sendmail(box, "-oem", "-oi", "--", "to@example.org", "cc@example.org", input=b"Subject: m\n\nhi\n")
    assert proc.returncode == 0, proc.stderr
    delivered(box, "to@example.org")
    delivered(box, "cc@example.org")


def test_logwatch_command_line_without_i_stops_at_lone_dot(box):
    box.start()
    body = b"To: root\nSubject: Logwatch\n\nreport\n.\nnot part of it\n"
    proc = sendmail(box, "-t", input=body)
    assert proc.returncode == 0, proc.stderr
    got = delivered(box, "root")
    assert got.endswith(b"report\n") and b"not part" not in got


def test_bsd_mailx_as_user_through_a_sendmail_symlink(box, tmp_path):
    box.start()
    bindir = tempfile.mkdtemp(prefix="pmbin-", dir="/tmp")
    try:
        os.chmod(bindir, 0o755)
        launcher = os.path.join(bindir, "pmaster")
        with open(launcher, "w") as f:
            f.write("#!%s\nimport sys\nsys.path.insert(0, %r)\nfrom pmaster.cli import main\nsys.exit(main())\n"
                    % (sys.executable, REPO))
        os.chmod(launcher, 0o755)
        os.symlink(launcher, os.path.join(bindir, "sendmail"))
        rc = os.path.join(bindir, "mailrc")
        with open(rc, "w") as f:
            f.write("set sendmail=%s/sendmail\n" % bindir)
        os.chmod(rc, 0o644)
        env = {"MAILRC": rc, "PMASTER_CONFIG": box.config_path, "HOME": "/tmp"}
        proc = as_user(box.user, ["mail", "-s", "hello from mailx", "to@example.org"], input=b"mailx body\n",
                       env=env)
        assert proc.returncode == 0, proc.stderr
        got = delivered(box, "to@example.org")
        assert b"Subject: hello from mailx" in got and b"mailx body" in got
        assert b"from userid %d" % box.user.pw_uid in got
    finally:
        shutil.rmtree(bindir, ignore_errors=True)


def test_pickup_within_a_second_while_running(box):
    box.start()
    proc = sendmail(box, "to@example.org", input=b"Subject: quick\n\nx\n")
    assert proc.returncode == 0
    start = time.monotonic()
    delivered(box, "to@example.org")
    assert time.monotonic() - start < 5.0


def test_message_without_header_gets_from_date_message_id_and_separator(box):
    box.start()
    proc = sendmail(box, "to@example.org", input=b"just a line\n", user=box.user)
    assert proc.returncode == 0
    got = delivered(box, "to@example.org")
    head, body = got.split(b"\n\n", 1)
    assert b"From: Test User <%s@box.test>" % box.user.pw_name.encode() in head
    assert b"Date: " in head and b"Message-ID: " in head and body == b"just a line\n"


def test_unknown_recipient_bounces_to_sender(box):
    box.start()
    proc = sendmail(box, "-f", "back@example.org", "nobody@nowhere.test", input=b"Subject: lost\n\nx\n")
    assert proc.returncode == 0
    got = delivered(box, "back@example.org")
    assert b"nobody@nowhere.test" in got and b"5.1.1" in got


def test_bs_smtp_dialogue_on_stdin(box):
    box.start()
    dialogue = (b"EHLO me\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<to@example.org>\r\nDATA\r\n"
                b"Subject: bs\r\n\r\n..dotted\r\n.\r\nQUIT\r\n")
    proc = sendmail(box, "-bs", input=dialogue)
    replies = [line[:3] for line in proc.stdout.split(b"\r\n") if line[:3].isdigit() and line[3:4] == b" "]
    assert proc.returncode == 0 and replies == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert delivered(box, "to@example.org").endswith(b"\n.dotted\n")


def test_mailq_name_and_bp_list_the_queue(box):
    proc = sendmail(box, "to@example.org", input=b"x\n")
    bindir = tempfile.mkdtemp(prefix="pmbin-", dir="/tmp")
    try:
        box.start()
        delivered(box, "to@example.org")
        link = os.path.join(bindir, "mailq")
        os.symlink(os.path.join(REPO, "pmaster", "__main__.py"), link)
        for argv in ([sys.executable, link, "-C", box.config_path],
                     [sys.executable, "-m", "pmaster", "sendmail", "-bp", "-C", box.config_path]):
            proc = run(argv)
            assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    finally:
        shutil.rmtree(bindir, ignore_errors=True)


# -- bad input: SPEC answers, nothing lost


def test_no_recipients_is_64_and_nothing_written(box):
    proc = sendmail(box, "-i")
    assert proc.returncode == 64 and b"no recipients" in proc.stderr and maildrop(box) == []


def test_t_without_recipient_headers_is_64(box):
    proc = sendmail(box, "-t", input=b"Subject: none\n\nx\n")
    assert proc.returncode == 64 and b"no recipient addresses found" in proc.stderr and maildrop(box) == []


def test_unknown_option_is_64(box):
    proc = sendmail(box, "-Z", "root")
    assert proc.returncode == 64 and proc.stderr == b"pmaster sendmail: unknown option -Z\n"


def test_crlf_in_sender_is_64(box):
    proc = sendmail(box, "-f", "evil\r\nRCPT TO:<x>", "root")
    assert proc.returncode == 64 and b"CR, LF or NUL" in proc.stderr and maildrop(box) == []


def test_bad_recipient_address_is_64(box):
    proc = sendmail(box, "a b@example.org@")
    assert proc.returncode == 64 and b"bad recipient address" in proc.stderr and maildrop(box) == []


def test_spool_that_cannot_take_it_is_75(box, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tmp_path / "p.cf"
    cfg.write_text("[core]\n  hostname = box.test\n  spool-directory = %s/spool\n" % blocker)
    proc = run([sys.executable, "-m", "pmaster", "sendmail", "-C", str(cfg), "root"], input=b"x\n")
    assert proc.returncode == 75 and b"Traceback" not in proc.stderr and proc.stderr.count(b"\n") == 1


def test_cut_short_maildrop_file_moves_to_corrupt(box):
    assert sendmail(box, "to@example.org", input=b"Subject: a\n\nfull body\n").returncode == 0
    name = maildrop(box)[0]
    path = os.path.join(box.spool_dir, "maildrop", name)
    size = os.path.getsize(path)
    os.truncate(path, size - 20)
    box.start()
    corrupt = os.path.join(box.spool_dir, "corrupt", "maildrop." + name)
    assert wait_for(lambda: os.path.exists(corrupt), 10), box.log_text()
    assert wait_for(lambda: "maildrop: %s (uid=0): cut short" % name in box.log_text(), 10), box.log_text()
    assert box.smtp().noop()[0] == 250  # the daemon keeps serving


def test_unfinished_stale_maildrop_file_moves_to_corrupt(box):
    box.start()
    path = os.path.join(box.spool_dir, "maildrop", "0000000000000UNFINISHED")
    with open(path, "wb") as f:
        f.write(b"#pmaster-maildrop 1\n{")
    os.chmod(path, 0o600)
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    corrupt = os.path.join(box.spool_dir, "corrupt", "maildrop.0000000000000UNFINISHED")
    assert wait_for(lambda: os.path.exists(corrupt), 10), box.log_text()
    assert wait_for(lambda: "never finished by its writer" in box.log_text(), 10)


def test_maildrop_is_not_listable_or_readable_by_users(box):
    box.start()
    md = os.path.join(box.spool_dir, "maildrop")
    assert oct(os.stat(md).st_mode & 0o7777) == "0o3733"
    plain = ["setpriv", "--reuid=%d" % box.user.pw_uid, "--regid=%d" % box.user.pw_gid, "--init-groups", "--"]
    assert run(plain + ["ls", md]).returncode != 0
    path = os.path.join(md, "planted")
    with open(path, "wb") as f:
        f.write(b"x")
    os.chmod(path, 0o640)  # as a finished file of root's would be, but not complete: stays until stale
    assert run(plain + ["cat", path]).returncode != 0
    os.unlink(path)


def test_symlink_in_maildrop_is_removed_not_followed(box):
    box.start()
    link = os.path.join(box.spool_dir, "maildrop", "evil")
    os.symlink("/etc/shadow", link)
    assert wait_for(lambda: not os.path.lexists(link), 10)
    assert wait_for(lambda: "not a plain file with one link" in box.log_text(), 10)
    assert not os.path.exists(os.path.join(box.spool_dir, "corrupt", "maildrop.evil"))


def test_daemon_survives_garbage_in_maildrop(box):
    box.start()
    path = os.path.join(box.spool_dir, "maildrop", "garbage")
    with open(path, "wb") as f:
        f.write(os.urandom(300))
    os.chmod(path, 0o740)
    assert wait_for(lambda: os.path.exists(os.path.join(box.spool_dir, "corrupt", "maildrop.garbage")), 10)
    assert sendmail(box, "to@example.org", input=b"x\n").returncode == 0
    delivered(box, "to@example.org")
    assert socket.create_connection(("127.0.0.1", box.port), 5).close() is None
