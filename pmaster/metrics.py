"""Prometheus metrics: every metric defined here, served on ``[metrics] listen-port`` at ``/metrics``.

API:
  ``Metrics(runtime_sessions, spool_source)``: owns a private ``CollectorRegistry``; ``count(what, listener,
     *labels)`` is the SMTP side's hook, ``delivery(mailer, result, seconds)`` the scheduler's.
  ``MetricsServer(metrics, listen)``: serves ``/metrics`` only (404 elsewhere) through ``metricshttp``: one
     reader thread, ``METRICS_WORKERS`` answering threads, at most ``METRICS_MAX_CONNECTIONS`` connections,
     request heads due within 5 s; ``start()`` / ``stop()``.
  ``parse_listen(text) -> (host, port)``: a bare port binds 127.0.0.1 (metrics stay on loopback unless asked).
Invariants: ``pmaster_`` prefix, base units, ``_total`` / ``_seconds`` / ``_bytes`` suffixes, labels from small
  fixed sets (listener, mailer, result, reason, state), never an address. Queue size by state and the oldest
  message's age are collected at scrape time from the spool, so they are right even after a restart, and
  cached for ``QUEUE_CACHE_SECONDS`` (one spool scan serves every scrape in that time).
"""

import logging
import socket
import threading
import time
from typing import Callable, Dict, Iterator, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pmaster.envelope import PENDING
from pmaster.errors import PmasterError, SpoolError
from pmaster.metricshttp import BoundedHttpServer
from pmaster.spool import Spool

log = logging.getLogger("pmaster.metrics")

REJECTION_REASONS = ("no_route", "routing_error", "size", "bare_newline", "loop", "limit", "policy", "other",
                     # SPEC 6's set besides the reasons above (no_route and routing_error are its "route")
                     "syntax", "route", "auth", "policy_service", "spf", "dnsbl", "verify")
SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
DELIVERY_RESULTS = ("sent", "deferred", "bounced")
POLICY_ACTIONS = ("ok", "dunno", "reject", "defer", "defer_if_permit", "defer_if_reject", "code", "prepend", "warn",
                  "info", "hold", "discard", "unknown", "failed")

QUEUE_CACHE_SECONDS = 3.0  # queue gauges are this old at most
METRICS_WORKERS = 2  # threads answering scrapes
METRICS_MAX_CONNECTIONS = 64  # open connections; the oldest idle one makes room for a new one


class _ScrapeCollector:
    """Gauges computed when Prometheus scrapes: sessions per listener and the queue by state."""

    def __init__(self, sessions: Callable[[], Dict[str, int]], spool: Callable[[], Optional[Spool]]):
        self.sessions = sessions
        self.spool = spool
        # Issue 17 item 8: reading every envelope per scrape let scrapes load the disk; one scan serves all
        # scrapes for QUEUE_CACHE_SECONDS, and concurrent scrapes wait for the scan in progress.
        self._queue_lock = threading.Lock()
        self._queue_cached: Optional[Tuple[float, Tuple[Dict[str, int], float]]] = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        active = GaugeMetricFamily("pmaster_smtpd_sessions_active", "SMTP sessions in progress",
                                   labels=["listener"])
        for listener, n in sorted(self.sessions().items()):
            active.add_metric([listener], n)
        yield active
        counts, oldest = self._queue_cached_or_scanned()
        size = GaugeMetricFamily("pmaster_queue_messages", "Messages in the queue by state", labels=["state"])
        for state in ("active", "deferred", "hold"):
            size.add_metric([state], counts.get(state, 0))
        yield size
        yield GaugeMetricFamily("pmaster_queue_oldest_message_age_seconds",
                                "Age of the oldest message in the queue (0 when empty)", value=oldest)

    def _queue_cached_or_scanned(self) -> Tuple[Dict[str, int], float]:
        with self._queue_lock:
            now = time.monotonic()
            if self._queue_cached is None or now - self._queue_cached[0] >= QUEUE_CACHE_SECONDS:
                self._queue_cached = (now, self._queue())
            return self._queue_cached[1]

    def _queue(self) -> Tuple[Dict[str, int], float]:
        spool = self.spool()
        counts: Dict[str, int] = {}
        oldest = 0.0
        if spool is None:
            return counts, oldest
        now = time.time()
        for qid in spool.ids():
            try:
                env = spool.load(qid)
            except SpoolError:
                continue
            due = [r.next_attempt for r in env.recipients if r.state == PENDING]
            state = "hold" if env.held else ("active" if due and min(due) <= now else "deferred")
            counts[state] = counts.get(state, 0) + 1
            oldest = max(oldest, now - env.arrival)
        return counts, oldest


class Metrics:
    def __init__(self, sessions: Callable[[], Dict[str, int]] = dict,
                 spool: Callable[[], Optional[Spool]] = lambda: None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter("pmaster_smtpd_connections", "SMTP connections accepted", ["listener"],
                                   registry=r)
        self.messages = Counter("pmaster_messages_received", "Messages accepted (250 after DATA)", ["listener"],
                                registry=r)
        self.received_bytes = Counter("pmaster_received_bytes", "Octets of accepted messages", ["listener"],
                                      registry=r)
        self.rejections = Counter("pmaster_smtpd_rejections", "Commands or messages refused, by reason",
                                  ["listener", "reason"], registry=r)
        self.tls_sessions = Counter("pmaster_smtpd_tls_sessions", "Sessions that completed STARTTLS", ["listener"],
                                    registry=r)
        self.deliveries = Counter("pmaster_deliveries", "Delivery attempts per recipient by mailer and result",
                                  ["mailer", "result"], registry=r)
        self.delivery_seconds = Histogram("pmaster_delivery_duration_seconds", "Duration of delivery attempts",
                                          ["mailer"], registry=r,
                                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        # Anti-spam (SPEC 6). The zone label takes only the values of [smtpd] dnsbl lines: a set the
        # administrator writes down, a few entries long, never anything a client sends.
        self.spf_results = Counter("pmaster_spf_results", "SPF evaluations at MAIL FROM by result",
                                   ["listener", "result"], registry=r)
        self.dnsbl_hits = Counter("pmaster_dnsbl_hits", "Clients found listed in a DNS blocklist, by zone",
                                  ["listener", "zone"], registry=r)
        self.policy_answers = Counter("pmaster_policy_service_answers", "Policy service answers by action",
                                      ["action"], registry=r)
        self.policy_seconds = Histogram("pmaster_policy_service_duration_seconds",
                                        "Time from a policy service request to its answer (or failure)", registry=r,
                                        buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        r.register(_ScrapeCollector(sessions, spool))

    def count(self, what: str, listener: str, *labels: str) -> None:
        if what == "connection":
            self.connections.labels(listener).inc()
        elif what == "message":
            self.messages.labels(listener).inc()
            if labels and labels[0].isdigit():
                self.received_bytes.labels(listener).inc(int(labels[0]))
        elif what == "rejection":
            reason = labels[0] if labels and labels[0] in REJECTION_REASONS else "other"
            self.rejections.labels(listener, reason).inc()
        elif what == "tls":
            self.tls_sessions.labels(listener).inc()

    def spf_result(self, listener: str, result: str) -> None:
        self.spf_results.labels(listener, result if result in SPF_RESULTS else "permerror").inc()

    def dnsbl_hit(self, listener: str, zone: str) -> None:
        self.dnsbl_hits.labels(listener, zone).inc()

    def policy_service(self, action: str, seconds: float) -> None:
        """One answer of a policy service (``action`` from ``POLICY_ACTIONS``; else "unknown")."""
        self.policy_answers.labels(action if action in POLICY_ACTIONS else "unknown").inc()
        self.policy_seconds.observe(seconds)

    def delivery(self, mailer: str, result: str, seconds: float) -> None:
        mailer = mailer if mailer in ("pipe", "relay") else "other"
        result = result if result in DELIVERY_RESULTS else "deferred"
        self.deliveries.labels(mailer, result).inc()
        self.delivery_seconds.labels(mailer).observe(seconds)


def parse_listen(text: str) -> Tuple[str, int]:
    text = text.strip()
    host = "127.0.0.1"
    port_text = text
    if text.startswith("["):
        end = text.find("]")
        host, port_text = text[1:end], text[end + 2:]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    if host in ("*", ""):
        host = "0.0.0.0"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise PmasterError("[metrics] listen-port %r: expected PORT or HOST:PORT" % text)
    return host, int(port_text)


def _answer(registry: CollectorRegistry) -> Callable[[str, str], Tuple[int, str, bytes]]:
    def answer(method: str, target: str) -> Tuple[int, str, bytes]:
        if target.split("?", 1)[0] != "/metrics":
            return 404, "text/plain; charset=utf-8", b"only /metrics is served here\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"GET /metrics\n"
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

    return answer


class MetricsServer:
    """``/metrics`` only, with bounded threads and connections and request deadlines (``metricshttp``)."""

    def __init__(self, metrics: Metrics, listen: str):
        host, port = parse_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.server = BoundedHttpServer((host, port), family, _answer(metrics.registry),
                                            workers=METRICS_WORKERS, max_connections=METRICS_MAX_CONNECTIONS)
        except OSError as exc:
            raise PmasterError("[metrics] cannot listen on %s:%d: %s" % (host, port, exc.strerror or exc))
        self.address = self.server.server_address

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
