"""Issue 15 item 5: a flush really tries refused hosts again (SPEC 9), and trusted clients skip the per-IP limit."""

import json
import os
import socket
import subprocess
import sys

from pmaster.tests.daemon_fixture import REPO, DaemonProcess, InProcessSmtpd, free_port, wait_for
from pmaster.tests.smtpsink import SmtpSink

RELAY_CONFIG = """\
[core]
  hostname = box.test
  spool-directory = {spool}
  pid-file = {tmp}/run/pmaster.pid
  retry-min = 1h
  retry-max = 4h

[smtpd test]
  name = mx.test
  listen-port = 127.0.0.1:{port}

[route]
  @example.net  relay(127.0.0.1:{relay})
"""


def queue(daemon, *args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "pmaster", "queue", "-c", daemon.config_path] + list(args),
                          capture_output=True, text=True, timeout=60, env=env)


def recipients(daemon):
    proc = queue(daemon, "list", "--json")
    return [r for m in json.loads(proc.stdout) for r in m["recipients"]]


def test_flush_attempts_every_recipient_of_a_host_that_refused(tmp_path):
    relay_port = free_port()
    daemon = DaemonProcess(tmp_path, RELAY_CONFIG, values={"relay": relay_port},
                           env={"PMASTER_DRAIN_SECONDS": "2"}).start()
    try:
        smtp = daemon.smtp()
        for i in range(5):
            smtp.sendmail("a@box.test", ["r%d@example.net" % i], b"Subject: %d\r\n\r\nx\r\n" % i)
        smtp.quit()
        # Every recipient deferred once: the first refused, the others skipped without a try (no attempt counted).
        assert wait_for(lambda: len([r for r in recipients(daemon) if r["last_reply"]]) == 5, 20), \
            daemon.log_text()
        attempts = sorted(r["attempts"] for r in recipients(daemon))
        assert attempts[-1] == 1 and sum(attempts) < 5, attempts
        with SmtpSink(port=relay_port) as sink:
            proc = queue(daemon, "flush")
            assert proc.returncode == 0, proc.stderr
            assert wait_for(lambda: len(sink.messages) == 5, 20), daemon.log_text()
        assert wait_for(lambda: queue(daemon, "list", "--json").stdout.strip() == "[]", 10)
        assert "queue flushed: refused hosts are tried again" in daemon.log_text()
    finally:
        daemon.stop()


def test_untried_recipients_do_not_double_their_backoff(tmp_path):
    relay_port = free_port()
    daemon = DaemonProcess(tmp_path, RELAY_CONFIG, values={"relay": relay_port},
                           env={"PMASTER_DRAIN_SECONDS": "2"}).start()
    try:
        smtp = daemon.smtp()
        smtp.sendmail("a@box.test", ["first@example.net"], b"Subject: 1\r\n\r\nx\r\n")
        assert wait_for(lambda: any(r["attempts"] == 1 for r in recipients(daemon)), 20)
        smtp.sendmail("a@box.test", ["second@example.net"], b"Subject: 2\r\n\r\nx\r\n")
        smtp.quit()
        assert wait_for(lambda: any("not tried" in r["last_reply"] for r in recipients(daemon)), 20)
        second = [r for r in recipients(daemon) if r["address"] == "second@example.net"][0]
        assert second["attempts"] == 0
    finally:
        daemon.stop()


LIMIT_CONFIG = """\
[core]
  hostname = box.test
  spool-directory = {spool}
  trusted-networks = 127.0.0.1

[smtpd test]
  name = mx.test
  listen-port = 127.0.0.1:25
  max-connections-per-ip = 3

[route]
  @example.org  pipe(cat >/dev/null)
"""


def _open_sessions(port, source, count):
    socks, codes = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        codes.append(s.recv(512)[:3])
        socks.append(s)
    return socks, codes


def test_trusted_client_skips_max_connections_per_ip(tmp_path):
    with InProcessSmtpd(tmp_path, LIMIT_CONFIG) as server:
        socks, codes = _open_sessions(server.port, "127.0.0.1", 30)
        try:
            assert codes == [b"220"] * 30
        finally:
            for s in socks:
                s.close()


def test_untrusted_client_still_gets_the_per_ip_limit(tmp_path):
    with InProcessSmtpd(tmp_path, LIMIT_CONFIG) as server:
        socks, codes = _open_sessions(server.port, "127.0.0.2", 4)
        try:
            assert codes == [b"220"] * 3 + [b"421"]
        finally:
            for s in socks:
                s.close()
