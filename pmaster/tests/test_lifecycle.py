"""Daemon lifecycle: start-up order, pid file, --daemon, signals (TERM, HUP), logging, privilege drop.

Every test runs the real daemon (``python -m pmaster run``) on a temporary configuration with a free
127.0.0.1 port and a pipe mailer that appends to a file, and talks SMTP to it with smtplib.
"""

import glob
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

import pytest

from pmaster.tests.daemon_fixture import free_port, process_dead, wait_until

PM = [sys.executable, "-m", "pmaster"]
MESSAGE = "From: a@example.org\r\nSubject: %s\r\n\r\nhello\r\n"


# ----------------------------------------------------------------------------------------------------
# Helpers




class Site:
    """A configuration directory: config file, spool, pid file, mailer output."""

    def __init__(self, root: Path, routes: str = "joe@localhost tofile\n", core: str = "", extra: str = ""):
        self.root = root
        self.port = free_port()
        self.cf = root / "pm.cf"
        self.out = root / "out" / "mbox"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file = root / "run" / "pm.pid"
        self.stderr_path = root / "stderr.txt"
        self.proc: Optional[subprocess.Popen] = None
        self.write(routes, core, extra)

    def write(self, routes: str, core: str = "", extra: str = "", listen: str = "") -> None:
        self.cf.write_text(
            "[core]\n  hostname = localhost\n  spool-directory = spool\n  pid-file = run/pm.pid\n"
            "  workers = 2\n" + core +
            "[pipe tofile]\n  exec = /bin/sh -c \"cat >> %s\"\n" % self.out +
            "[smtpd localhost]\n  listen-port = 127.0.0.1:%d\n" % self.port + listen +
            extra + "[route]\n" + routes)

    def start(self, env: Optional[dict] = None, log_glob: Optional[str] = None) -> subprocess.Popen:
        """Start in the foreground; ready once "pmaster started" is logged (on stderr, or in ``log_glob``)."""
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(PM + ["run", "-c", str(self.cf)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         env=dict(os.environ, **(env or {})))
        source = self.stderr if log_glob is None else (lambda: self.logs(log_glob))
        wait_until(lambda: "pmaster started" in source() or self.proc.poll() is not None, 15, "start")
        assert self.proc.poll() is None, self.stderr()
        return self.proc

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def logs(self, pattern: str) -> str:
        return "".join(Path(f).read_text(errors="replace") for f in sorted(glob.glob(str(self.root / pattern))))

    def wait_log(self, text: str, timeout: float = 10.0, source: Optional[Callable[[], str]] = None) -> None:
        source = source or self.stderr
        wait_until(lambda: text in source(), timeout, repr(text))

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def smtp(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
        client.ehlo("client.example.org")
        return client

    def mailbox(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def delivered(self, marker: str, timeout: float = 10.0) -> None:
        wait_until(lambda: marker in self.mailbox(), timeout, "delivery of %s" % marker)


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    if s.proc is not None and s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait(10)


def send(site: Site, marker: str, rcpt: str = "joe@localhost") -> str:
    client = site.smtp()
    try:
        client.mail("a@example.org")
        code, _ = client.rcpt(rcpt)
        assert code == 250
        code, text = client.data(MESSAGE % marker)
        assert code == 250, text
    finally:
        client.quit()
    return text.decode().rsplit(" ", 1)[-1]  # "Ok: queued as QID"


# ----------------------------------------------------------------------------------------------------
# Start-up


def test_config_error_refuses_start_with_file_line_col(tmp_path):
    cf = tmp_path / "bad.cf"
    cf.write_text("[core]\n  workers = many\n[smtpd localhost]\n  listen-port = 127.0.0.1:%d\n" % free_port())
    proc = subprocess.run(PM + ["run", "-c", str(cf)], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert re.search(r"^%s:2:\d+: error: " % re.escape(str(cf)), proc.stderr, re.M), proc.stderr
    assert "Traceback" not in proc.stderr


def test_port_in_use_refuses_start_with_one_line(site):
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", site.port))
        busy.listen(1)
        proc = subprocess.run(PM + ["run", "-c", str(site.cf)], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert "cannot listen on 127.0.0.1:%d" % site.port in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not site.pid_file.exists()


def test_pid_file_names_the_daemon_while_it_runs_and_is_removed_at_exit(site):
    proc = site.start()
    assert site.pid_file.read_text().strip() == str(proc.pid)
    assert site.stop() == 0
    assert not site.pid_file.exists()


def test_stale_pid_file_does_not_prevent_start(site):
    gone = subprocess.Popen(["true"])
    gone.wait()
    site.pid_file.parent.mkdir()
    site.pid_file.write_text("%d\n" % gone.pid)
    proc = site.start()
    assert site.pid_file.read_text().strip() == str(proc.pid)
    assert site.stop() == 0


def test_pid_file_of_a_live_daemon_refuses_start(site, tmp_path):
    first = site.start()
    other = Site(tmp_path / "other")
    other.cf.write_text(site.cf.read_text().replace(str(site.port), str(other.port))
                        .replace("run/pm.pid", str(site.pid_file)))
    proc = subprocess.run(PM + ["run", "-c", str(other.cf)], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert "pmaster is already running" in proc.stderr and str(first.pid) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert site.pid_file.read_text().strip() == str(first.pid)  # the running daemon's pid file is kept
    assert site.stop() == 0


# ----------------------------------------------------------------------------------------------------
# --daemon


def test_daemon_option_detaches_writes_pid_file_and_answers_smtp(site):
    proc = subprocess.run(PM + ["run", "-c", str(site.cf), "--daemon"], capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode == 0, proc.stderr
    pid = int(site.pid_file.read_text())
    try:
        assert os.getsid(pid) != os.getsid(0)
        assert os.getsid(pid) != pid  # not a session leader: it can never reacquire a terminal
        client = site.smtp()
        assert client.noop()[0] == 250
        client.quit()
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: process_dead(pid), 15, "the daemon to exit")
    wait_until(lambda: not site.pid_file.exists(), 5, "pid file removal")


def test_daemon_option_reports_the_childs_error_and_exits_1(site, tmp_path):
    first = site.start()
    other = Site(tmp_path / "other")
    other.cf.write_text(site.cf.read_text().replace(str(site.port), str(other.port))
                        .replace("run/pm.pid", str(site.pid_file)))
    proc = subprocess.run(PM + ["run", "-c", str(other.cf), "--daemon"], capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode == 1
    assert "pmaster is already running" in proc.stderr and str(first.pid) in proc.stderr
    assert site.stop() == 0


# ----------------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_lets_a_transaction_in_progress_finish_then_exits_0(site):
    proc = site.start()
    client = site.smtp()
    assert client.mail("a@example.org")[0] == 250
    assert client.rcpt("joe@localhost")[0] == 250
    proc.send_signal(signal.SIGTERM)
    site.wait_log("stopping")
    code, text = client.data(MESSAGE % "during-shutdown")
    assert code == 250, text
    try:
        client.quit()
    except smtplib.SMTPServerDisconnected:
        pass
    assert proc.wait(15) == 0
    assert not site.pid_file.exists()
    assert list((site.root / "spool").rglob("*")), "the message was stored"


def test_sigterm_stops_accepting_new_connections(site):
    proc = site.start()
    client = site.smtp()
    client.mail("a@example.org")  # holds the daemon in its drain
    proc.send_signal(signal.SIGTERM)
    site.wait_log("stopping")
    time.sleep(0.7)  # the listener's serve_forever polls every 0.5 s
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", site.port, timeout=5).ehlo()
    client.rset()
    client.close()
    assert proc.wait(15) == 0


def test_sigterm_tells_an_idle_session_421_at_once_and_does_not_wait_for_it(site):
    proc = site.start()
    client = site.smtp()  # EHLO done, no transaction: nothing to wait for
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, text = client.getreply()
    assert (code, text[:5]) == (421, b"4.3.2")
    assert proc.wait(15) == 0
    assert time.monotonic() - started < 5
    client.close()


def test_sigterm_kills_mailer_children_after_the_drain_and_keeps_the_mail(site):
    site.write("joe@localhost slow\n", extra="[pipe slow]\n  exec = /bin/sh -c \"sleep 60; cat\"\n")
    proc = site.start(env={"PMASTER_DRAIN_SECONDS": "1"})
    qid = send(site, "slow-one")
    children = wait_until(lambda: _children(proc.pid), 10, "the mailer child")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert time.monotonic() - signalled < 1 + 4  # the drain, then the kill: not the mailer's own timeout
    assert "killing 1 mailer process(es) still running after the drain" in site.stderr()
    for pid in children:
        assert process_dead(pid)
    assert re.search(r"%s: to=<joe@localhost> .*status=deferred" % qid, site.stderr()), site.stderr()
    assert any(qid in p.name for p in (site.root / "spool").rglob("*"))


def _children(pid: int) -> List[int]:
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = open(stat).read()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        if fields[1] == str(pid) and fields[0] != "Z":
            out.append(int(stat.split("/")[2]))
    return out


# ----------------------------------------------------------------------------------------------------
# SIGHUP


def test_sighup_makes_a_new_route_deliverable_in_open_and_new_sessions(site):
    proc = site.start()
    early = site.smtp()
    early.mail("a@example.org")
    assert early.rcpt("ann@localhost")[0] == 550
    early.rset()
    site.write("joe@localhost tofile\nann@localhost tofile\n")
    proc.send_signal(signal.SIGHUP)
    site.wait_log("configuration reloaded")
    assert early.mail("a@example.org")[0] == 250
    assert early.rcpt("ann@localhost")[0] == 250  # the session opened before the HUP goes on
    assert early.data(MESSAGE % "after-hup-open")[0] == 250
    early.quit()
    send(site, "after-hup-new", rcpt="ann@localhost")
    site.delivered("after-hup-open")
    site.delivered("after-hup-new")
    assert proc.poll() is None
    assert site.stop() == 0


def test_sighup_with_an_invalid_file_logs_its_errors_and_keeps_the_running_configuration(site):
    proc = site.start()
    site.cf.write_text(site.cf.read_text() + "[smtpd localhost]\n  no-such-key = 1\n")
    proc.send_signal(signal.SIGHUP)
    site.wait_log("keeping the running configuration")
    assert re.search(r"%s:\d+:\d+: error: " % re.escape(str(site.cf)), site.stderr()), site.stderr()
    assert proc.poll() is None
    send(site, "still-routed")
    site.delivered("still-routed")
    assert site.stop() == 0


def test_sighup_binds_a_new_listen_address(site):
    proc = site.start()
    port = free_port()
    site.write("joe@localhost tofile\n", listen="  listen-port = 127.0.0.1:%d\n" % port)
    proc.send_signal(signal.SIGHUP)
    site.wait_log("now listening for localhost on 127.0.0.1:%d" % port)
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    assert client.ehlo()[0] == 250
    client.quit()
    assert site.stop() == 0


# ----------------------------------------------------------------------------------------------------
# Logging


def test_foreground_without_logger_logs_to_stderr(site):
    site.start()
    qid = send(site, "to-stderr")
    site.wait_log("%s: to=<joe@localhost>" % qid)
    assert "%s: from=<a@example.org>" % qid in site.stderr()
    assert site.stop() == 0


def test_logfile_pattern_receives_delivery_lines_with_queue_id_first(site):
    site.write("joe@localhost tofile\n", core="  logger = lf\n",
               extra="[logfile lf]\n  file = \"log/pm-%Y-%m-%d.log\"\n")
    site.start(log_glob="log/*.log")
    qid = send(site, "to-logfile")
    site.wait_log("status=sent", source=lambda: site.logs("log/*.log"))
    names = [os.path.basename(f) for f in glob.glob(str(site.root / "log" / "*"))]
    today = {time.strftime("pm-%Y-%m-%d.log", time.localtime(time.time() - d)) for d in (0, 86400)}
    assert names and set(names) <= today
    lines = [ln for ln in site.logs("log/*.log").splitlines() if qid in ln]
    assert lines
    for line in lines:
        assert line.split(": ", 2)[2].startswith("%s: " % qid), line  # "... name[pid]: INFO: QID: ..."
    assert any(re.search(r": %s: to=<joe@localhost> .*status=sent" % qid, ln) for ln in lines)
    assert "to-logfile" not in site.stderr() and "status=sent" not in site.stderr()
    assert site.stop() == 0


def test_listener_logger_gets_that_listeners_lines(site):
    site.write("joe@localhost tofile\n", listen="  logger = sessions\n",
               extra="[logfile sessions]\n  file = \"log/smtpd-%Y%m%d.log\"\n")
    site.start()
    qid = send(site, "listener-log")
    site.delivered("listener-log")
    site.wait_log("%s: to=<joe@localhost>" % qid)  # the scheduler's line: [core] logger (stderr)
    session_log = site.logs("log/smtpd-*.log")
    assert "%s: from=<a@example.org>" % qid in session_log
    assert "connect from [127.0.0.1]" in session_log
    assert "%s: from=<a@example.org>" % qid not in site.stderr()
    assert site.stop() == 0


def test_syslog_without_dev_log_falls_back_to_stderr_with_one_warning(site):
    assert not os.path.exists("/dev/log")
    site.write("joe@localhost tofile\n", core="  logger = syslog\n")
    proc = site.start()
    proc.send_signal(signal.SIGHUP)
    site.wait_log("configuration reloaded")
    qid = send(site, "via-fallback")
    site.wait_log("%s: to=<joe@localhost>" % qid)
    assert site.stderr().count("syslog is not reachable") == 1
    assert site.stop() == 0


# ----------------------------------------------------------------------------------------------------
# Privileges (the tests run as root)


@pytest.fixture
def open_dir():
    """A directory user nobody can reach: pytest's tmp_path lives under a 0700 directory."""
    path = tempfile.mkdtemp(prefix="pmaster-priv-", dir="/tmp")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_root_start_drops_to_user_and_group_and_still_delivers(open_dir):
    assert os.geteuid() == 0, "this machine runs the tests as root"
    site = Site(open_dir, core="  user-id = nobody\n  group-id = nogroup\n  logger = lf\n",
                extra="[logfile lf]\n  file = \"log/pm-%Y-%m-%d.log\"\n")
    site.out.parent.chmod(0o777)
    proc = site.start(log_glob="log/*.log")
    try:
        status = open("/proc/%d/status" % proc.pid).read()
        nobody_uid, nogroup_gid = 65534, 65534
        assert re.search(r"^Uid:\s+%d\s+%d\s+%d\s+%d$" % ((nobody_uid,) * 4), status, re.M), status
        assert re.search(r"^Gid:\s+%d\s+%d\s+%d\s+%d$" % ((nogroup_gid,) * 4), status, re.M), status
        assert re.search(r"^Groups:\s*$", status, re.M), status
        spool = open_dir / "spool"
        # 0711: local users may pass through to maildrop/ (pmaster sendmail), never list the spool
        assert spool.stat().st_uid == nobody_uid and spool.stat().st_mode & 0o777 == 0o711
        qid = send(site, "as-nobody")
        site.delivered("as-nobody")
        assert site.out.stat().st_uid == nobody_uid
        site.wait_log("%s: to=<joe@localhost>" % qid, source=lambda: site.logs("log/*.log"))
        assert "running as uid=%d gid=%d" % (nobody_uid, nogroup_gid) in site.logs("log/*.log")
        assert (open_dir / "log").stat().st_uid == nobody_uid  # made by the daemon for its log: handed over
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
