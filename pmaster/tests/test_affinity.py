"""The daemon keeps its threads on one CPU of those it may use, and its pipe programs on all of them
(pmaster/affinity.py). A real daemon; affinities read from /proc as an administrator would."""

import os
import sys

import pytest

from pmaster.tests.daemon_fixture import DaemonProcess, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU affinity is Linux only")

CONFIG = """\
[core]
  hostname = mx.cpu.test
  spool-directory = {spool}
  pid-file = {tmp}/pmaster.pid
  dns-server = 127.0.0.1:9

[smtpd cpu]
  listen-port = 127.0.0.1:{port}

[route]
  @x.test pipe(grep Cpus_allowed_list /proc/self/status > {tmp}/cpus.txt)
"""


def cpu_list(text: str) -> set:
    """'0-2,5' -> {0, 1, 2, 5}"""
    out = set()
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def thread_cpus(pid: int) -> list:
    sets = []
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                lines = [ln for ln in f if ln.startswith("Cpus_allowed_list:")]
        except FileNotFoundError:
            continue  # a thread that just ended
        sets.append(cpu_list(lines[0].split(":", 1)[1]))
    return sets


def start(tmp_path, **env) -> DaemonProcess:
    return DaemonProcess(tmp_path, CONFIG, env=dict(env, PMASTER_DRAIN_SECONDS="1")).start()


def test_daemon_threads_share_one_cpu_of_those_allowed(tmp_path):
    allowed = os.sched_getaffinity(0)
    d = start(tmp_path)
    try:
        sets = thread_cpus(d.proc.pid)
        assert len(sets) > 3  # main, listener, scheduler, workers, log writer
        if len(allowed) == 1:
            assert all(s == allowed for s in sets)
        else:
            assert len({frozenset(s) for s in sets}) == 1
            (only,) = {frozenset(s) for s in sets}
            assert len(only) == 1 and only <= allowed
            assert "threads kept on CPU %d" % min(only) in d.log_text()
    finally:
        d.stop()


def test_pipe_program_may_run_on_every_cpu_the_daemon_was_allowed(tmp_path):
    d = start(tmp_path)
    try:
        with d.smtp() as c:
            assert c.sendmail("a@sender.test", ["bob@x.test"], b"Subject: cpu\r\n\r\nhi\r\n") == {}
        out = os.path.join(str(tmp_path), "cpus.txt")
        assert wait_for(lambda: os.path.exists(out) and os.path.getsize(out) > 0 and not d.queue_ids(), 10)
        with open(out) as f:
            assert cpu_list(f.read().split(":", 1)[1]) == os.sched_getaffinity(0)
        # and the thread that forked it went back to the daemon's CPU
        assert len({frozenset(s) for s in thread_cpus(d.proc.pid)}) == 1
    finally:
        d.stop()


def test_pin_cpu_no_in_the_environment_leaves_the_affinity_alone(tmp_path):
    d = start(tmp_path, PMASTER_PIN_CPU="no")
    try:
        assert all(s == os.sched_getaffinity(0) for s in thread_cpus(d.proc.pid))
        assert "threads kept on CPU" not in d.log_text()
    finally:
        d.stop()
