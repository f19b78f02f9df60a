"""Issue 17 item 8: the metrics endpoint under attack: bounded threads, deadlines, only /metrics, cached gauges."""

import os
import socket
import time
import urllib.error
import urllib.request

import pytest

from pmaster import metrics as metrics_module
from pmaster.envelope import Envelope, Recipient
from pmaster.metrics import Metrics, MetricsServer
from pmaster.metricshttp import HEAD_SECONDS
from pmaster.spool import Spool
from pmaster.tests.daemon_fixture import DaemonProcess, free_port

CONFIG = """\
[core]
  hostname = mx.test
  spool-directory = {spool}
  pid-file = {tmp}/pmaster.pid
[smtpd test]
  listen-port = 127.0.0.1:{port}
[metrics]
  listen-port = 127.0.0.1:{metrics}
[route]
  joe@example.org    pipe(cat >/dev/null)
"""
IDLE_CONNECTIONS = 300
THREAD_SLACK = 3  # threads the daemon may start on its own meanwhile (a delivery worker, a removal sync)


@pytest.fixture
def daemon(tmp_path):
    port = free_port()
    d = DaemonProcess(tmp_path, CONFIG, values={"metrics": port}).start()
    d.metrics_port = port
    yield d
    d.stop()


def threads(pid: int) -> int:
    return len(os.listdir("/proc/%d/task" % pid))


def get(port: int, path: str = "/metrics"):
    return urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10)


def half_sent(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    return s


def test_idle_half_sent_requests_do_not_grow_threads_and_a_scrape_still_answers(daemon):
    with get(daemon.metrics_port) as resp:
        assert resp.status == 200
    before = threads(daemon.pid)
    idle = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(half_sent(daemon.metrics_port))
        assert threads(daemon.pid) <= before + THREAD_SLACK
        with get(daemon.metrics_port) as resp:
            assert resp.status == 200 and b"pmaster_queue_messages" in resp.read()
        assert threads(daemon.pid) <= before + THREAD_SLACK
    finally:
        for s in idle:
            s.close()


def test_half_sent_request_is_closed_after_the_head_deadline(daemon):
    s = half_sent(daemon.metrics_port)
    start = time.monotonic()
    s.settimeout(HEAD_SECONDS + 10)
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - start < HEAD_SECONDS + 10


@pytest.mark.parametrize("path", ["/", "/favicon.ico", "/metricsx", "/metrics/../etc"])
def test_only_metrics_is_served(daemon, path):
    with pytest.raises(urllib.error.HTTPError) as err:
        get(daemon.metrics_port, path)
    assert err.value.code == 404


def test_post_to_metrics_is_refused(daemon):
    req = urllib.request.Request("http://127.0.0.1:%d/metrics" % daemon.metrics_port, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 405


def test_oversized_request_head_is_refused(daemon):
    with socket.create_connection(("127.0.0.1", daemon.metrics_port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-Fill: " + b"a" * 20000 + b"\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 431")


def queued_message(spool: Spool) -> None:
    with spool.writer() as w:
        w.write(b"Subject: t\r\n\r\nhello\r\n")
        w.commit(Envelope(w.queue_id, "a@example.org", [Recipient("joe@x.test", "joe@x.test", "pipe", "p")],
                          time.time()))


def queue_gauge(m: Metrics) -> float:
    for family in m.registry.collect():
        if family.name == "pmaster_queue_messages":
            return sum(s.value for s in family.samples)
    raise AssertionError("no pmaster_queue_messages")


def test_queue_gauges_are_cached_between_scrapes(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path / "spool"))
    m = Metrics(spool=lambda: spool)
    assert queue_gauge(m) == 0
    queued_message(spool)
    assert queue_gauge(m) == 0  # the scan of the previous scrape still serves
    monkeypatch.setattr(metrics_module, "QUEUE_CACHE_SECONDS", 0.0)  # the cache's time is up
    assert queue_gauge(m) == 1


def test_many_scrapes_do_not_grow_threads(daemon):
    with get(daemon.metrics_port) as resp:
        resp.read()
    before = threads(daemon.pid)
    for _ in range(50):
        with get(daemon.metrics_port) as resp:
            assert resp.status == 200
            resp.read()
    assert threads(daemon.pid) <= before + THREAD_SLACK


def test_metrics_server_on_ipv6_loopback_answers_and_stops():
    server = MetricsServer(Metrics(), "[::1]:%d" % free_port("::1"))
    server.start()
    try:
        with urllib.request.urlopen("http://[::1]:%d/metrics" % server.address[1], timeout=10) as resp:
            assert resp.status == 200 and b"pmaster_queue_messages" in resp.read()
    finally:
        server.stop()
    assert not any(t.is_alive() for t in server.server.threads)
