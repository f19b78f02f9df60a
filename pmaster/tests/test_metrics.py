"""Prometheus metrics: served by the real daemon, parsed with prometheus-client's own text parser."""

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pmaster.errors import PmasterError
from pmaster.metrics import parse_listen
from pmaster.tests.daemon_fixture import DaemonProcess, free_port, wait_for

CONFIG = """\
[core]
  hostname = mx.test
  spool-directory = {spool}
  pid-file = {tmp}/pmaster.pid
  retry-min = 1m
  dns-server = 127.0.0.1:9
[smtpd test]
  listen-port = 127.0.0.1:{port}
[metrics]
  listen-port = 127.0.0.1:{metrics}
[route]
  joe@example.org    pipe(cat >/dev/null)
  slow@example.org   pipe(exit 75)
"""


def scrape(port: int) -> dict:
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def daemon(tmp_path):
    port = free_port()
    d = DaemonProcess(tmp_path, CONFIG, values={"metrics": port}).start()
    d.metrics_port = port
    yield d
    d.stop()


def test_metrics_endpoint_parses_and_has_every_family(daemon):
    samples = scrape(daemon.metrics_port)
    names = {name for name, _ in samples}
    assert "pmaster_queue_messages" in names
    assert "pmaster_queue_oldest_message_age_seconds" in names


def test_counters_move_after_a_delivery(daemon):
    before = scrape(daemon.metrics_port)
    with daemon.smtp() as s:
        s.sendmail("a@sender.test", ["joe@example.org"], b"Subject: m\r\n\r\nbody\r\n")
    wait_for(lambda: value(scrape(daemon.metrics_port), "pmaster_deliveries_total", mailer="pipe", result="sent")
             > value(before, "pmaster_deliveries_total", mailer="pipe", result="sent"), timeout=10)
    after = scrape(daemon.metrics_port)
    assert value(after, "pmaster_messages_received_total", listener="test") == 1
    assert value(after, "pmaster_received_bytes_total", listener="test") > 20
    assert value(after, "pmaster_smtpd_connections_total", listener="test") >= 1
    assert value(after, "pmaster_delivery_duration_seconds_count", mailer="pipe") >= 1


def test_rejections_are_counted_by_reason(daemon):
    with daemon.smtp() as s:
        s.ehlo()
        s.mail("a@sender.test")
        code, _ = s.rcpt("nobody@nowhere.test")
        assert code == 550
    samples = scrape(daemon.metrics_port)
    assert value(samples, "pmaster_smtpd_rejections_total", listener="test", reason="no_route") == 1


def test_queue_gauges_count_deferred_messages(daemon):
    with daemon.smtp() as s:
        s.sendmail("a@sender.test", ["slow@example.org"], b"Subject: m\r\n\r\nbody\r\n")
    wait_for(lambda: value(scrape(daemon.metrics_port), "pmaster_queue_messages", state="deferred") == 1,
             timeout=10)
    samples = scrape(daemon.metrics_port)
    assert value(samples, "pmaster_queue_oldest_message_age_seconds") >= 0
    assert value(samples, "pmaster_deliveries_total", mailer="pipe", result="deferred") == 1


def test_bare_metrics_port_binds_loopback_only():
    assert parse_listen("9100") == ("127.0.0.1", 9100)
    assert parse_listen("*:9100") == ("0.0.0.0", 9100)
    with pytest.raises(PmasterError):
        parse_listen("9100x")
