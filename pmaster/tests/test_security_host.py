"""Issue 17, host side: root start and the spool (item 1), relay AUTH and TLS (7), the pid file (9), open relays (12).

The tests run as root, as on the CI machine: the daemon user is ``nobody``/``nogroup``. Attacks are planted in
temporary directories under /tmp (mode 0755, so ``nobody`` can reach them); the victims are files the tests
create there, never real system files.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trustme

from pmaster import safefs
from pmaster.config import load, load_with_diagnostics
from pmaster.daemon import refuse_open_relay
from pmaster.errors import ConfigError, PmasterError
from pmaster.routing import static_check
from pmaster.spool import Spool
from pmaster.tests.daemon_fixture import REPO, DaemonProcess, free_port, wait_until
from pmaster.tests.smtpsink import SmtpSink, tls_server_context

NOBODY, NOGROUP = 65534, 65534
RUN_TIMEOUT = 20.0


@pytest.fixture
def open_dir():
    """A directory user nobody can reach (pytest's tmp_path lives under a 0700 directory)."""
    path = tempfile.mkdtemp(prefix="pmaster-sec-", dir="/tmp")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def config_text(root: Path, port: int, core: str = "", extra: str = "",
                routes: str = "@example.org pipe(cat >/dev/null)\n") -> str:
    return ("[core]\n  hostname = mx.test\n  spool-directory = %s/spool\n  pid-file = %s/run/pm.pid\n"
            "  retry-min = 1s\n  retry-max = 2s\n%s"
            "[smtpd test]\n  listen-port = 127.0.0.1:%d\n%s[route]\n%s" % (root, root, core, port, extra, routes))


def write_config(root: Path, **kwargs) -> Path:
    path = root / "pm.cf"
    path.write_text(config_text(root, free_port(), **kwargs))
    return path


def run_refused(cf: Path, argv_prefix=()):
    """Run ``pmaster run`` and expect it to give up: returns (exit status, output); a start that serves fails."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = list(argv_prefix) + [sys.executable, "-m", "pmaster", "run", "-c", str(cf)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        raise AssertionError("pmaster started although it should have refused:\n%s" % out.decode("utf-8", "replace"))
    return proc.returncode, out.decode("utf-8", "replace")


def victim_file(root: Path) -> Path:
    victim = root / "victim-secret"
    victim.write_text("root:secret-hash:19000:0:99999:7:::\n")
    os.chown(str(victim), 0, 0)
    victim.chmod(0o600)
    return victim


def made_spool(root: Path) -> Path:
    Spool(str(root / "spool"))
    return root / "spool"


# ----------------------------------------------------------------------------------------------------
# Item 1: root start never follows links in the spool


def test_root_start_refuses_symlink_in_corrupt_and_keeps_target_owner(open_dir):
    assert os.geteuid() == 0, "this machine runs the tests as root"
    victim = victim_file(open_dir)
    os.symlink(str(victim), str(made_spool(open_dir) / "corrupt" / "0000000000000ABCDE.msg"))
    cf = write_config(open_dir, core="  user-id = nobody\n  group-id = nogroup\n")
    status, out = run_refused(cf)
    assert status == 1 and "is a symbolic link" in out and "refusing to start" in out, out
    assert "Traceback" not in out
    st = victim.stat()
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_root_start_never_hands_over_a_directory_linked_from_tmp(open_dir):
    target = open_dir / "victim-dir"
    target.mkdir(mode=0o755)
    os.symlink(str(target), str(made_spool(open_dir) / "tmp" / "d"))
    cf = write_config(open_dir, core="  user-id = nobody\n")
    status, out = run_refused(cf)
    assert status == 1 and "tmp/d is a symbolic link" in out, out
    assert target.stat().st_uid == 0


def test_root_start_refuses_hard_link_to_a_file_outside_the_spool(open_dir):
    victim = victim_file(open_dir)
    os.link(str(victim), str(made_spool(open_dir) / "queue" / "0000000000000ABCDE.msg"))
    cf = write_config(open_dir, core="  user-id = nobody\n")
    status, out = run_refused(cf)
    assert status == 1 and "has 2 hard links" in out, out
    assert victim.stat().st_uid == 0


def test_hand_over_gives_root_made_files_and_directories_to_the_daemon_user(tmp_path):
    spool = made_spool(tmp_path)
    record = spool / "queue" / "0000000000000ABCDE.env"
    record.write_text("{}")
    safefs.hand_over_spool(str(spool), NOBODY, NOGROUP)
    for path in (spool, spool / "queue", spool / "corrupt", record):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (NOBODY, NOGROUP), path
    assert spool.stat().st_mode & 0o777 == 0o700


def test_hand_over_refuses_files_of_a_third_user(tmp_path):
    spool = made_spool(tmp_path)
    stranger = spool / "corrupt" / "planted"
    stranger.write_text("x")
    os.chown(str(stranger), 4242, 4242)
    with pytest.raises(PmasterError, match="planted is owned by uid 4242"):
        safefs.hand_over_spool(str(spool), NOBODY, NOGROUP)


def test_hand_over_refuses_a_fifo(tmp_path):
    spool = made_spool(tmp_path)
    os.mkfifo(str(spool / "tmp" / "pipe"))
    with pytest.raises(PmasterError, match="pipe is not a regular file"):
        safefs.hand_over_spool(str(spool), NOBODY, NOGROUP)


def test_hand_over_follows_a_configured_spool_path_that_is_a_link(tmp_path):
    real = made_spool(tmp_path)
    link = tmp_path / "spool-link"
    os.symlink(str(real), str(link))
    safefs.hand_over_spool(str(link), NOBODY, NOGROUP)
    assert (real / "queue").stat().st_uid == NOBODY



def test_hand_over_keeps_the_submitter_of_a_maildrop_file_and_gives_it_the_daemon_group(tmp_path):
    spool = made_spool(tmp_path)
    (spool / "maildrop").mkdir()
    submission = spool / "maildrop" / "sub1"
    submission.write_text("x")
    os.chown(str(submission), 4242, 4242)
    safefs.hand_over_spool(str(spool), NOBODY, NOGROUP)
    st = submission.stat()
    assert (st.st_uid, st.st_gid) == (4242, NOGROUP)


def test_hand_over_leaves_links_in_maildrop_alone_without_refusing(tmp_path):
    spool = made_spool(tmp_path)
    (spool / "maildrop").mkdir()
    victim = victim_file(tmp_path)
    os.symlink(str(victim), str(spool / "maildrop" / "planted-link"))
    os.link(str(victim), str(spool / "maildrop" / "planted-hard-link"))
    safefs.hand_over_spool(str(spool), NOBODY, NOGROUP)
    st = victim.stat()
    assert (st.st_uid, st.st_gid) == (0, 0)


# ----------------------------------------------------------------------------------------------------
# Item 9: the pid file


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_run_refuses_a_pid_directory_others_can_write(open_dir, mode):
    (open_dir / "run").mkdir()
    (open_dir / "run").chmod(mode)
    cf = write_config(open_dir)
    status, out = run_refused(cf)
    assert status == 1 and "refusing pid file directory" in out, out
    assert not (open_dir / "run" / "pm.pid").exists()


def test_pid_file_is_not_written_through_a_link_at_the_old_temporary_name(open_dir, tmp_path):
    """The former temp name was PIDFILE.<pid>.tmp: plant it for the pid the daemon will have (exec keeps it)."""
    victim = victim_file(open_dir)
    (open_dir / "run").mkdir(mode=0o755)
    pid_file = open_dir / "run" / "pm.pid"
    d = DaemonProcess(tmp_path, config_text(open_dir, 0).replace("127.0.0.1:0", "127.0.0.1:{port}"))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = 'ln -s "$1" "$2.$$.tmp" && exec "$3" -m pmaster run -c "$4"'
    proc = subprocess.Popen(["/bin/sh", "-c", script, "sh", str(victim), str(pid_file), sys.executable,
                             d.config_path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        wait_until(lambda: pid_file.exists() or proc.poll() is not None, 15, "the pid file")
        assert proc.poll() is None
        assert pid_file.read_text() == "%d\n" % proc.pid
        assert victim.read_text().startswith("root:secret-hash")
        assert not pid_file.is_symlink() and pid_file.stat().st_mode & 0o777 == 0o644
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_pid_file_replaces_a_planted_link_instead_of_following_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "run").mkdir(mode=0o755)
    pid_file = tmp_path / "run" / "pm.pid"
    os.symlink(str(victim), str(pid_file))
    safefs.write_pid_file(str(pid_file), 4321)
    assert victim.read_text() == "keep\n"
    assert not pid_file.is_symlink() and pid_file.read_text() == "4321\n"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["pm.pid"]  # no temporary file left behind


def test_pid_directory_made_under_a_loose_umask_passes_its_own_check(tmp_path):
    old = os.umask(0o002)
    try:
        safefs.write_pid_file(str(tmp_path / "newrun" / "pm.pid"), 4321)
    finally:
        os.umask(old)
    assert (tmp_path / "newrun").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "newrun" / "pm.pid").read_text() == "4321\n"


# ----------------------------------------------------------------------------------------------------
# Item 7: relay AUTH needs verified TLS


def relay_section(tmp_path: Path, port: int, tls: str = "") -> str:
    pw = tmp_path / "relay-password"
    pw.write_text("s3cret pw\n")
    return ("[relay smart]\n  address = 127.0.0.1:%d\n  auth-user = joe\n  auth-password-file = %s\n%s"
            % (port, pw, "  tls = %s\n" % tls if tls else ""))


def test_auth_user_makes_required_the_default_tls(tmp_path):
    cf = tmp_path / "pm.cf"
    cf.write_text(relay_section(tmp_path, 2525) + "[route]\n@x.test smart\n")
    assert load(str(cf)).relays["smart"].tls == "required"


@pytest.mark.parametrize("tls", ["opportunistic", "none"])
def test_auth_user_with_weaker_tls_is_a_check_error(tmp_path, tls):
    cf = tmp_path / "pm.cf"
    cf.write_text(relay_section(tmp_path, 2525, tls) + "[route]\n@x.test smart\n")
    config, diags = load_with_diagnostics(str(cf))
    assert config is None
    assert [(d.line, d.severity) for d in diags] == [(5, "error")]
    assert "auth-user needs tls = required" in diags[0].message


def test_relay_with_self_signed_certificate_never_receives_the_password(tmp_path):
    untrusted = trustme.CA()  # the man in the middle: a certificate no trust store knows
    with SmtpSink(tls_context=tls_server_context(untrusted, "127.0.0.1", "localhost"),
                  auth_users={"joe": "s3cret pw"}) as sink:
        d = DaemonProcess(tmp_path, config_text(tmp_path, 0, routes="@x.test smart\n",
                                                extra=relay_section(tmp_path, sink.port))
                          .replace("127.0.0.1:0", "127.0.0.1:{port}"))
        d.start()
        try:
            with d.smtp() as s:
                s.sendmail("a@example.org", ["bob@x.test"], "Subject: t\r\n\r\nhello\r\n")
            qid = d.queue_ids()[0]
            wait_until(lambda: d.envelope(qid)["recipients"][0]["attempts"] >= 1, 15, "a delivery attempt")
            assert sink.connections >= 1
            assert sink.auth_attempts == [] and sink.messages == []
            assert not any(c.upper().startswith("AUTH") for sess in sink.sessions for c in sess.commands)
            assert d.envelope(qid)["recipients"][0]["state"] == "pending"
        finally:
            d.stop()


# ----------------------------------------------------------------------------------------------------
# Item 12: open relays


OPEN = "[smtpd mx]\n  listen-port = 0.0.0.0:25\n[route]\n  @ relay(smart.example.net)\n"


def test_run_refuses_an_open_relay(tmp_path):
    cf = tmp_path / "pm.cf"
    cf.write_text(config_text(tmp_path, free_port(), routes="@ relay(smart.example.net)\n")
                  .replace("[smtpd test]\n  listen-port = 127.0.0.1:", "[smtpd test]\n  listen-port = 0.0.0.0:"))
    status, out = run_refused(cf)
    assert status == 1 and ": error: " in out and "open relay" in out and "allow-open-relay" in out, out


def test_check_reports_an_open_relay_as_an_error(tmp_path):
    cf = tmp_path / "pm.cf"
    cf.write_text(OPEN)
    assert [d.severity for d in static_check(load(str(cf)))] == ["error"]


def test_allow_open_relay_turns_the_error_into_a_warning_and_run_accepts_it(tmp_path):
    cf = tmp_path / "pm.cf"
    cf.write_text("[core]\n  allow-open-relay = yes\n" + OPEN)
    config = load(str(cf))
    assert [d.severity for d in static_check(config)] == ["warning"]
    refuse_open_relay(config)  # what pmaster run asks: no exception


def test_named_table_inheriting_the_unnamed_catch_all_is_named_in_the_error(tmp_path):
    cf = tmp_path / "pm.cf"
    cf.write_text("[smtpd mx]\n  listen-port = 0.0.0.0:25\n  routing-table = inbound\n"
                  "[route]\n  @ relay(smart.example.net)\n[route inbound]\n  @example.org pipe(cat)\n")
    with pytest.raises(ConfigError) as err:
        refuse_open_relay(load(str(cf)))
    text = str(err.value)
    assert "routing table 'inbound' has no '@' of its own and inherits the catch-all '@'" in text
    assert "%s:5" % cf in text


def test_reload_into_an_open_relay_keeps_the_running_configuration(tmp_path):
    d = DaemonProcess(tmp_path)
    d.start()
    try:
        text = Path(d.config_path).read_text().replace("[route]\n", "[route]\n  @ relay()\n")
        Path(d.config_path).write_text(text + "[smtpd wide]\n  listen-port = 0.0.0.0:%d\n" % free_port())
        d.reload()
        wait_until(lambda: "reload failed" in d.log_text(), 15, "the refused reload")
        assert "open relay" in d.log_text()
        with d.smtp() as s:
            assert s.ehlo()[0] == 250
            code, _ = s.docmd("MAIL FROM:<a@example.org>")
            assert code == 250
            assert s.docmd("RCPT TO:<bob@elsewhere.test>")[0] == 550  # the catch-all did not take effect
    finally:
        d.stop()


def test_shipped_configurations_have_no_open_relay():
    for name in ("postmaster.cf", "postmaster.cf.example"):
        config = load(os.path.join(REPO, "conf", name))
        assert [d for d in static_check(config) if d.is_error] == []

