"""contrib/init.d/postmaster (LSB init script), contrib/default/postmaster and the systemd unit.

The script runs under sh and dash (and bash), with start-stop-daemon on PATH and with a PATH that hides it,
against a real daemon on a temporary configuration. Settings reach it through a defaults file named by
POSTMASTER_DEFAULTS_FILE, so the machine's /etc/default/postmaster never matters.
"""

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from pmaster.tests.daemon_fixture import free_port, process_dead, wait_until

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "contrib" / "init.d" / "postmaster"
DEFAULTS_EXAMPLE = REPO / "contrib" / "default" / "postmaster"
UNIT = REPO / "contrib" / "systemd" / "postmaster.service"
SHELLS = ["sh", "dash", "bash"]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ["grep", "sleep", "rm", "cat", "tr"]  # what the script may run besides builtins (no start-stop-daemon)


# ----------------------------------------------------------------------------------------------------
# Helpers




class Installation:
    """A pmaster "installed" under a temporary directory, as the init script sees it."""

    def __init__(self, root: Path, shell: str = "sh", ssd: bool = True):
        self.root = root
        self.shell = shell
        self.port = free_port()
        self.cf = root / "postmaster.cf"
        self.pid_file = root / "run" / "postmaster.pid"
        self.out = root / "mbox"
        self.bin = root / "bin" / "pmaster"
        self.bin.parent.mkdir(parents=True)
        self.bin.write_text("#!/bin/sh\nexec %s -m pmaster \"$@\"\n" % sys.executable)
        self.bin.chmod(0o755)
        self.defaults = root / "defaults"
        self.defaults.write_text("PMASTER_BIN=%s\nPMASTER_CONFIG=%s\nPIDFILE=%s\nSTOP_TIMEOUT=15\n"
                                 % (self.bin, self.cf, self.pid_file))
        self.path = SYSTEM_PATH if ssd else str(self.hidden_path())
        self.write_config("joe@localhost tofile\n")

    def hidden_path(self) -> Path:
        """A PATH of symlinks to the tools the script needs: start-stop-daemon is not among them."""
        tools = self.root / "tools"
        tools.mkdir()
        for name in TOOLS:
            (tools / name).symlink_to(shutil.which(name))
        return tools

    def write_config(self, routes: str) -> None:
        self.cf.write_text(
            "[core]\n  hostname = localhost\n  spool-directory = spool\n  pid-file = %s\n  workers = 2\n"
            "[pipe tofile]\n  exec = /bin/sh -c \"cat >> %s\"\n"
            "[smtpd localhost]\n  listen-port = 127.0.0.1:%d\n[route]\n%s"
            % (self.pid_file, self.out, self.port, routes))

    def run(self, action: str, env: Optional[Dict[str, str]] = None, timeout: float = 30
            ) -> subprocess.CompletedProcess:
        base = {"PATH": self.path, "POSTMASTER_DEFAULTS_FILE": str(self.defaults), "PYTHONPATH": str(REPO)}
        base.update(env or {})
        shell = shutil.which(self.shell)  # resolved here: the script's PATH may hide it
        return subprocess.run([shell, str(SCRIPT), action], env=base, cwd=str(REPO),
                              capture_output=True, text=True, timeout=timeout)

    def pid(self) -> int:
        return int(self.pid_file.read_text())

    def rcpt(self, address: str) -> int:
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
        try:
            client.ehlo("client.example.org")
            client.mail("a@example.org")
            return client.rcpt(address)[0]
        finally:
            client.quit()

    def kill_leftover(self) -> None:
        try:
            pid = self.pid()
        except (OSError, ValueError):
            return
        if not process_dead(pid) and b"pmaster" in Path("/proc/%d/cmdline" % pid).read_bytes():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def make(tmp_path):
    made: List[Installation] = []

    def factory(shell: str = "sh", ssd: bool = True) -> Installation:
        inst = Installation(tmp_path / ("i%d" % len(made)), shell, ssd)
        made.append(inst)
        return inst

    yield factory
    for inst in made:
        inst.kill_leftover()


def stale_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


# ----------------------------------------------------------------------------------------------------
# The daemon's life through the script


@pytest.mark.parametrize("ssd", [True, False], ids=["start-stop-daemon", "no-start-stop-daemon"])
@pytest.mark.parametrize("shell", SHELLS)
def test_start_status_reload_stop_through_the_script(make, shell, ssd):
    inst = make(shell, ssd)
    started = inst.run("start")
    assert started.returncode == 0, started.stderr
    pid = inst.pid()
    assert not process_dead(pid)
    status = inst.run("status")
    assert status.returncode == 0 and "running (pid %d)" % pid in status.stdout
    assert inst.rcpt("ann@localhost") == 550

    inst.write_config("joe@localhost tofile\nann@localhost tofile\n")
    reloaded = inst.run("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    wait_until(lambda: inst.rcpt("ann@localhost") == 250, 10, "the reloaded route")
    assert inst.pid() == pid  # reloaded, not restarted

    stopped = inst.run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert process_dead(pid)
    assert not inst.pid_file.exists()
    after = inst.run("status")
    assert after.returncode == 3 and "not running" in after.stdout


def test_start_when_running_succeeds_without_a_second_daemon(make):
    inst = make()
    assert inst.run("start").returncode == 0
    pid = inst.pid()
    again = inst.run("start")
    assert again.returncode == 0 and "already running" in again.stdout
    assert inst.pid() == pid
    assert inst.run("stop").returncode == 0


def test_start_replaces_a_stale_pid_file(make):
    inst = make(ssd=True)
    inst.pid_file.parent.mkdir()
    inst.pid_file.write_text("%d\n" % stale_pid())
    started = inst.run("start")
    assert started.returncode == 0, started.stderr
    assert inst.run("status").returncode == 0
    assert inst.run("stop").returncode == 0


def test_start_failure_exits_1_with_the_daemons_message(make):
    inst = make()
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", inst.port))
        busy.listen(1)
        started = inst.run("start")
    assert started.returncode == 1
    assert "cannot listen on 127.0.0.1:%d" % inst.port in started.stderr
    assert inst.run("status").returncode == 3


def test_restart_with_an_invalid_file_keeps_the_daemon_running(make):
    inst = make(shell="dash")
    assert inst.run("start").returncode == 0
    pid = inst.pid()
    inst.cf.write_text(inst.cf.read_text() + "[core]\n  no-such-key = 1\n")
    restarted = inst.run("restart")
    assert restarted.returncode == 6
    assert re.search(r"postmaster.cf:\d+:\d+: error: ", restarted.stderr), restarted.stderr
    assert not process_dead(pid) and inst.pid() == pid
    assert inst.run("stop").returncode == 0


def test_restart_replaces_the_daemon(make):
    inst = make(shell="dash", ssd=False)
    assert inst.run("start").returncode == 0
    pid = inst.pid()
    restarted = inst.run("restart")
    assert restarted.returncode == 0, restarted.stderr
    assert inst.pid() != pid and process_dead(pid)
    assert inst.rcpt("joe@localhost") == 250
    assert inst.run("stop").returncode == 0


@pytest.mark.parametrize("ssd", [True, False], ids=["start-stop-daemon", "no-start-stop-daemon"])
def test_stop_sends_sigkill_after_the_timeout(make, ssd):
    inst = make("dash", ssd)
    # A process that ignores SIGTERM and looks like pmaster (its argv has pmaster and run).
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                 "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)", "pmaster", "run"],
                                stdout=subprocess.PIPE)
    try:
        assert stubborn.stdout.readline() == b"ready\n"
        # Reap it as soon as it dies, as init reaps a real daemon: start-stop-daemon waits out zombies.
        threading.Thread(target=stubborn.wait, daemon=True).start()
        inst.pid_file.parent.mkdir()
        inst.pid_file.write_text("%d\n" % stubborn.pid)
        started = time.monotonic()
        stopped = inst.run("stop", env={"STOP_TIMEOUT": "1"})
        assert stopped.returncode == 0, stopped.stderr
        assert stubborn.wait(5) == -signal.SIGKILL
        assert time.monotonic() - started < 10
        assert not inst.pid_file.exists()
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait()


# ----------------------------------------------------------------------------------------------------
# Status codes and usage (no daemon needed)


@pytest.mark.parametrize("shell", SHELLS)
def test_status_with_a_stale_pid_file_is_1(make, shell):
    inst = make(shell)
    inst.pid_file.parent.mkdir()
    inst.pid_file.write_text("%d\n" % stale_pid())
    status = inst.run("status")
    assert status.returncode == 1 and "pid file" in status.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_status_without_a_pid_file_is_3(make, shell):
    status = make(shell).run("status")
    assert status.returncode == 3 and "not running" in status.stdout


def test_status_with_a_pid_recycled_by_another_program_is_1(make):
    inst = make("dash")
    other = subprocess.Popen(["sleep", "30"])
    try:
        inst.pid_file.parent.mkdir()
        inst.pid_file.write_text("%d" % other.pid)  # no final newline: must still be read
        assert inst.run("status").returncode == 1
    finally:
        other.kill()
        other.wait()


def test_status_with_a_pid_recycled_by_a_program_naming_a_pmaster_file_is_1(make):
    inst = make("dash")
    other = subprocess.Popen(["sh", "-c", "sleep 30; :", "less", "/var/log/pmaster.log"])  # "; :": no exec
    try:
        inst.pid_file.parent.mkdir()
        inst.pid_file.write_text("%d\n" % other.pid)
        assert inst.run("status").returncode == 1
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("ssd", [True, False], ids=["start-stop-daemon", "no-start-stop-daemon"])
def test_stop_with_a_stale_pid_file_removes_it_and_succeeds(make, ssd):
    inst = make("dash", ssd)
    inst.pid_file.parent.mkdir()
    inst.pid_file.write_text("%d\n" % stale_pid())
    stopped = inst.run("stop")
    assert stopped.returncode == 0
    assert not inst.pid_file.exists()
    assert inst.run("status").returncode == 3


def test_reload_when_not_running_is_7(make):
    assert make("dash").run("reload").returncode == 7


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("action", ["bogus", ""])
def test_unknown_action_exits_2_with_usage(make, shell, action):
    result = make(shell).run(action)
    assert result.returncode == 2
    assert "Usage:" in result.stderr and "force-reload" in result.stderr


def test_environment_wins_over_the_defaults_file(make, tmp_path):
    inst = make("dash")
    stale = tmp_path / "env.pid"
    stale.write_text("%d\n" % stale_pid())
    assert inst.run("status").returncode == 3  # the defaults file's PIDFILE does not exist
    assert inst.run("status", env={"PIDFILE": str(stale)}).returncode == 1


def test_missing_pmaster_command_exits_5(make):
    inst = make("dash")
    result = inst.run("start", env={"PMASTER_BIN": str(inst.root / "no-such-pmaster")})
    assert result.returncode == 5 and "not installed" in result.stderr


# ----------------------------------------------------------------------------------------------------
# The files themselves


@pytest.mark.parametrize("shell", SHELLS)
def test_script_parses_under_each_shell(shell):
    assert subprocess.run([shell, "-n", str(SCRIPT)], timeout=10).returncode == 0


def test_script_has_an_lsb_header():
    text = SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    header = text[text.index("### BEGIN INIT INFO"):text.index("### END INIT INFO")]
    for key in ("Provides", "Required-Start", "Required-Stop", "Default-Start", "Default-Stop",
                "Short-Description", "Description"):
        assert re.search(r"^# %s:\s+\S" % key, header, re.M), key
    assert os.access(str(SCRIPT), os.X_OK)


def test_defaults_example_is_valid_sh_that_sets_nothing_by_default():
    out = subprocess.run(["dash", "-c", ". \"$1\"; echo \"[${PMASTER_BIN-}${PMASTER_CONFIG-}${PIDFILE-}]\"",
                          "sh", str(DEFAULTS_EXAMPLE)], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and out.stdout.strip() == "[]"
    for name in ("PMASTER_BIN", "PMASTER_CONFIG", "PIDFILE", "STOP_TIMEOUT"):
        assert "#%s=" % name in DEFAULTS_EXAMPLE.read_text()


def test_systemd_unit_runs_the_foreground_daemon_and_reloads_with_sighup(tmp_path):
    text = UNIT.read_text()
    service = text[text.index("[Service]"):text.index("[Install]")]
    assert re.search(r"^Type=simple$", service, re.M)
    assert re.search(r"^ExecStart=/usr/bin/pmaster run -c /etc/postmaster.cf$", service, re.M)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", service, re.M)
    assert re.search(r"^Restart=on-failure$", service, re.M)
    assert "--daemon" not in service
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # verification is optional: the static checks above still ran
    unit = tmp_path / "postmaster.service"
    unit.write_text(text.replace("/usr/bin/pmaster", str(Path(sys.executable).parent / "pmaster")
                                 if (Path(sys.executable).parent / "pmaster").exists()
                                 else shutil.which("pmaster") or "/bin/true"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
