"""Crash safety (SPEC 5): a daemon killed with SIGKILL while clients send, restarted on the same spool,
delivers every message it acknowledged with 250; a message is delivered twice only if it was in delivery
at the kill."""

import collections
import os
import smtplib
import threading
import time

from pmaster.tests.daemon_fixture import DaemonProcess, wait_for

CONFIG = """\
[core]
  hostname = mx.crash.test
  spool-directory = {spool}
  pid-file = {tmp}/pmaster.pid
  retry-min = 1s
  retry-max = 2s
  workers = {workers}
  dns-server = 127.0.0.1:9

[smtpd crash]
  listen-port = 127.0.0.1:{port}

[route]
  # One line per delivery, written in one write(2) at sed's exit: appends never interleave.
  @x.test pipe(sed -n 's/^X-Marker: //p' >> {tmp}/delivered.txt)
"""

TOTAL = 200
CLIENTS = 4
WORKERS = 4
KILL_AFTER = 80  # acknowledged messages before the SIGKILL
DEADLINE = 50.0  # seconds for the whole test


class Sender:
    """Sends TOTAL messages from CLIENTS threads; each try carries a fresh marker, so a message committed
    without its 250 reaching us (the kill) never counts against duplicates."""

    def __init__(self, daemon: DaemonProcess):
        self.daemon = daemon
        self.lock = threading.Lock()
        self.acked = []  # (marker, acked before the kill)
        self.killed = threading.Event()
        self.kill_now = threading.Event()
        self.end = time.monotonic() + DEADLINE

    def client(self, n: int) -> None:
        for i in range(TOTAL // CLIENTS):
            for attempt in range(1000):  # bounded by self.end as well
                if time.monotonic() > self.end:
                    return
                marker = "c%d-m%d-t%d" % (n, i, attempt)
                if self.send_one(marker):
                    break
                time.sleep(0.05)  # daemon down: wait for the restart

    def send_one(self, marker: str) -> bool:
        body = ("From: <a@sender.test>\r\nSubject: crash\r\nX-Marker: %s\r\n\r\nbody %s\r\n"
                % (marker, marker)).encode()
        try:
            with smtplib.SMTP(self.daemon.host, self.daemon.port, timeout=10) as c:
                c.sendmail("a@sender.test", ["bob@x.test"], body)
        except (OSError, smtplib.SMTPException):
            return False
        with self.lock:
            self.acked.append((marker, not self.killed.is_set()))
            if len(self.acked) >= KILL_AFTER:
                self.kill_now.set()
        return True


def delivered(daemon: DaemonProcess):
    try:
        with open(os.path.join(daemon.tmp, "delivered.txt")) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def test_kill_9_while_sending_loses_no_acknowledged_message(tmp_path):
    daemon = DaemonProcess(tmp_path, CONFIG, values={"workers": WORKERS})
    daemon.start()
    sender = Sender(daemon)
    threads = [threading.Thread(target=sender.client, args=(n,), name="client-%d" % n) for n in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        assert sender.kill_now.wait(DEADLINE / 2), "clients did not get %d messages through" % KILL_AFTER
        with sender.lock:
            sender.killed.set()
            daemon.kill9()
        acked_at_kill = len(sender.acked)
        daemon.start()
        for t in threads:
            t.join(max(0.0, sender.end - time.monotonic()))
        assert len(sender.acked) == TOTAL, "only %d of %d sent in time" % (len(sender.acked), TOTAL)
        assert acked_at_kill < TOTAL, "the kill came after the sending"
        acked = {marker for marker, _ in sender.acked}
        assert wait_for(lambda: acked <= set(delivered(daemon)), max(5.0, sender.end - time.monotonic())), \
            "lost: %s" % sorted(acked - set(delivered(daemon)))[:10]
        assert wait_for(lambda: not daemon.queue_ids(), 10)
    finally:
        daemon.stop()
    counts = collections.Counter(delivered(daemon))
    before_kill = {marker for marker, before in sender.acked if before}
    twice = [m for m, c in counts.items() if c > 1]
    # Only a message in delivery at the kill may come twice: at most one per worker.
    assert set(twice) <= before_kill and len(twice) <= WORKERS, twice
    assert all(c <= 2 for c in counts.values())
