"""Statistics since start for the dashboard, and the hooks that feed them; server-sent event framing.

API:
  ``Stats(sessions, queue_counts, interval=10)``: ``count(what, listener, *labels)`` and ``delivery(mailer,
    result, seconds)`` have the signatures of ``metrics.Metrics``' hooks (the SMTP side and the scheduler call
    them); ``snapshot()`` is the dashboard's data: totals, the current interval, and the history of the last
    hour (one point per interval: received, delivered, deferred, bounced, rejected, sessions, queue by state,
    oldest message); ``sample()`` closes intervals that are over (the web admin's ticker calls it).
  ``Tee(first, second)``: hands every hook call to both (the web admin's ``Stats`` and the Prometheus
    ``Metrics``), so the daemon's call sites stay as they are.
  ``sse(event, data) -> bytes``: one server-sent event (``text/event-stream``).
Invariants: a hook call is a lock and an integer addition: the accept path does not get slower when the web
  admin is on (scripts/bench-webadmin measures it). Memory is bounded: ``HISTORY`` points.
Threading: hooks run in session and delivery threads; ``sample`` and ``snapshot`` in the web admin's threads.
"""

import json
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

HISTORY_SECONDS = 3600
COUNTED = ("received", "delivered", "deferred", "bounced", "rejected")
_RESULTS = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced"}


class Stats:
    def __init__(self, sessions: Callable[[], int] = lambda: 0,
                 queue_counts: Callable[[], Tuple[Dict[str, int], float]] = lambda: ({}, 0.0),
                 interval: float = 10.0, clock: Callable[[], float] = time.time):
        self.sessions = sessions
        self.queue_counts = queue_counts
        self.interval = float(interval)
        self.clock = clock
        self.started = clock()
        self._lock = threading.Lock()
        self._current = dict.fromkeys(COUNTED, 0)
        self._totals = dict.fromkeys(COUNTED, 0)
        self._bucket_start = self._bucket_of(self.started)
        self._history: List[Dict[str, object]] = []
        self._limit = max(1, int(HISTORY_SECONDS / self.interval))
        self._queue: Tuple[Dict[str, int], float] = ({}, 0.0)

    def _bucket_of(self, t: float) -> float:
        return t - (t % self.interval)

    # -- hooks (hot path: keep them tiny)

    def count(self, what: str, listener: str, *labels: str) -> None:
        if what == "message":
            key = "received"
        elif what == "rejection":
            key = "rejected"
        else:
            return
        with self._lock:
            self._current[key] += 1

    def delivery(self, mailer: str, result: str, seconds: float) -> None:
        key = _RESULTS.get(result, "deferred")
        with self._lock:
            self._current[key] += 1

    # -- sampling

    def sample(self) -> None:
        """Close every interval that is over; the queue is looked at once per call (an index refresh)."""
        now = self.clock()
        if self._bucket_of(now) <= self._bucket_start:
            return
        self._queue = self.queue_counts()
        sessions = self.sessions()
        with self._lock:
            while self._bucket_of(now) > self._bucket_start:
                point: Dict[str, object] = {"t": int(self._bucket_start)}
                point.update(self._current)
                for k, v in self._current.items():
                    self._totals[k] += v
                self._current = dict.fromkeys(COUNTED, 0)
                point["sessions"] = sessions
                point["queue"] = dict(self._queue[0])
                point["oldest"] = int(self._queue[1])
                self._history.append(point)
                self._bucket_start += self.interval
            del self._history[:-self._limit]

    def snapshot(self, queue: Optional[Tuple[Dict[str, int], float]] = None) -> Dict[str, object]:
        queue = queue if queue is not None else self._queue
        with self._lock:
            current = dict(self._current)
            totals = {k: self._totals[k] + current[k] for k in COUNTED}
            history = list(self._history)
            start = self._bucket_start
        return {
            "now": int(self.clock()),
            "started": int(self.started),
            "interval": int(self.interval),
            "totals": totals,
            "current": dict(current, t=int(start)),
            "sessions": self.sessions(),
            "queue": dict(queue[0]),
            "oldest": int(queue[1]),
            "history": history,
        }


class Tee:
    """Both hooks at once: the daemon keeps one ``metrics`` attribute on the runtime and the scheduler."""

    def __init__(self, first, second):
        self.first = first
        self.second = second

    def count(self, what: str, listener: str, *labels: str) -> None:
        self.first.count(what, listener, *labels)
        self.second.count(what, listener, *labels)

    def delivery(self, mailer: str, result: str, seconds: float) -> None:
        self.first.delivery(mailer, result, seconds)
        self.second.delivery(mailer, result, seconds)

    def __getattr__(self, name: str):
        return getattr(self.second, name)  # anything else a caller expects of Metrics


def sse(event: str, data: object) -> bytes:
    """One event of a ``text/event-stream`` (JSON has no raw newlines, so one ``data:`` line)."""
    return ("event: %s\ndata: %s\n\n" % (event, json.dumps(data, separators=(",", ":")))).encode("utf-8")
