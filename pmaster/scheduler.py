"""Scheduler: drains the spool with a pool of delivery workers, retries with backoff, bounces, expires.

API:
  ``backoff(attempts, retry_min, retry_max) -> seconds``: pure; ``retry_min * 2**(attempts-1)`` capped.
  ``Scheduler(config_source, spool, route_bounce, now=time.time)``: ``start()``, ``notify(qid)`` (a new or
     changed message), ``stop(deadline)`` (finish or abandon deliveries in progress by ``deadline``).
  ``plan_jobs(env, config, now, busy)``: pure grouping of due recipients into delivery jobs.
Invariants:
  - The spool is the only input; the scheduler never imports routing: bounces are routed by the
    ``route_bounce`` callable the daemon passes in (unnamed ``[route]`` table, ``relay()`` for the rest).
  - A recipient is in at most one job at a time (``busy`` set), so a concurrent ``pmaster queue flush``
    never causes a second delivery. Results are applied under the message lock on a freshly loaded
    envelope and saved durably before the next attempt; a recipient recorded as sent is never retried.
  - At most ``destination-concurrency`` jobs per destination run at once; a job whose destination is full
    waits in the plan, never in a worker, so one dead destination cannot hold every worker.
  - Mailer sections are looked up by name at delivery time, so a reload applies to queued mail; a
    section that has gone defers the recipient.
Threading: one ``sched`` thread plans; ``deliver-N`` threads run jobs; shared state under ``_lock``.
"""

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

from pmaster import bounce as bounces
from pmaster.config import Config
from pmaster.envelope import BOUNCED, PENDING, SENT, Envelope, Recipient, split_address
from pmaster.errors import QueueIdError, SpoolError
from pmaster.mailers import OK, PERMFAIL, TEMPFAIL, Delivery, Result
from pmaster.spool import Spool

log = logging.getLogger("pmaster.scheduler")

RELAY_BATCH = 100
SCAN_INTERVAL = 2.0


def backoff(attempts: int, retry_min: int, retry_max: int) -> int:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
    if attempts < 1:
        return 0
    return int(min(retry_max, retry_min * (2 ** min(attempts - 1, 32))))


@dataclass(frozen=True)
class Job:
    queue_id: str
    mailer: str
    target: str
    destination: str
    indexes: Tuple[int, ...]  # positions in envelope.recipients


def destination_of(r: Recipient) -> str:
    """Jobs share a destination when they share mailer and target; relay() also needs the domain."""
    if r.mailer == "relay" and r.target.replace(" ", "") == "relay()":
        return "relay():%s" % split_address(r.address)[1]
    return "%s:%s" % (r.mailer, r.target)


def batch_limit(r: Recipient, config: Config) -> int:
    if r.mailer == "relay":
        return RELAY_BATCH
    pipe = config.pipes.get(r.target)
    return pipe.max_rcpt_to if pipe is not None else 1


def plan_jobs(env: Envelope, config: Config, now: float, busy: Set[Tuple[str, int]]) -> List[Job]:
    """Group the due, idle, pending recipients of one message into jobs (pure)."""
    if env.held:
        return []
    groups: Dict[str, List[int]] = {}
    for i, r in enumerate(env.recipients):
        if r.state != PENDING or r.next_attempt > now or (env.queue_id, i) in busy:
            continue
        groups.setdefault(destination_of(r), []).append(i)
    jobs = []
    for dest, idxs in groups.items():
        first = env.recipients[idxs[0]]
        size = batch_limit(first, config)
        for start in range(0, len(idxs), size):
            jobs.append(Job(env.queue_id, first.mailer, first.target, dest, tuple(idxs[start:start + size])))
    return jobs


def next_due(env: Envelope) -> Optional[float]:
    if env.held:
        return None
    due = [r.next_attempt for r in env.recipients if r.state == PENDING]
    return min(due) if due else None


MailerFn = Callable[[Delivery, str, str], List[Result]]
BounceRouter = Callable[[str, Config], List[Recipient]]


class Scheduler:
    def __init__(self, config_source: Callable[[], Config], spool: Spool, mailer: MailerFn,
                 route_bounce: BounceRouter, now: Callable[[], float] = time.time):
        self.config_source = config_source
        self.spool = spool
        self.mailer = mailer
        self.route_bounce = route_bounce
        self.now = now
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._busy: Set[Tuple[str, int]] = set()
        self._active: Dict[str, int] = {}
        self._known: Dict[str, Tuple[int, Optional[float]]] = {}  # qid -> (env mtime_ns, next due)
        self._dirty: Set[str] = set()
        self._threads: List[threading.Thread] = []
        self._stopping = False
        self._deadline: Optional[float] = None
        self._last_scan = 0.0
        self.in_flight = 0

    # -- lifecycle

    def start(self) -> None:
        moved = self.spool.recover()
        for qid in moved:
            log.warning("%s: unreadable spool record moved to corrupt/", qid)
        workers = self.config_source().core.workers
        sched = threading.Thread(target=self._plan_loop, name="sched", daemon=True)
        self._threads.append(sched)
        for n in range(workers):
            self._threads.append(threading.Thread(target=self._work_loop, name="deliver-%d" % n, daemon=True))
        for t in self._threads:
            t.start()

    def notify(self, qid: Optional[str] = None) -> None:
        with self._lock:
            if qid is not None:
                self._dirty.add(qid)
            else:
                self._last_scan = 0.0
        self._wake.set()

    def stop(self, deadline: float) -> None:
        """Stop planning; deliveries in progress get until ``deadline`` (time.monotonic) to finish."""
        with self._lock:
            self._stopping = True
            self._deadline = deadline
        self._wake.set()
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()) + 1.0)

    def idle(self) -> bool:
        with self._lock:
            return not self._busy and self._jobs.empty()

    # -- planning

    def _plan_loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                timeout = self._plan_once()
            except Exception:
                log.exception("scheduler planning failed; retrying")
                timeout = SCAN_INTERVAL
            self._wake.wait(timeout)
            self._wake.clear()

    def _plan_once(self) -> float:
        config = self.config_source()
        now = self.now()
        mono = time.monotonic()
        if mono - self._last_scan >= SCAN_INTERVAL:
            self._scan()
            self._last_scan = mono
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for qid in dirty:
            self._refresh(qid)
        wait = SCAN_INTERVAL
        for qid, (_, due) in sorted(self._known.items()):
            if due is None:
                continue
            if due > now:
                wait = min(wait, due - now)
                continue
            self._plan_message(qid, config, now)
        return max(0.05, wait)

    def _scan(self) -> None:
        present = set(self.spool.ids())
        for qid in list(self._known):
            if qid not in present:
                del self._known[qid]
        for qid in present:
            self._refresh(qid)

    def _refresh(self, qid: str) -> None:
        path = os.path.join(self.spool.directory, "queue", qid + ".env")
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            self._known.pop(qid, None)
            return
        known = self._known.get(qid)
        if known is not None and known[0] == mtime:
            return
        try:
            env = self.spool.load(qid)
        except QueueIdError:
            self._known.pop(qid, None)
            return
        except SpoolError as exc:
            log.error("%s: %s (moved to corrupt/)", qid, exc)
            self._known.pop(qid, None)
            return
        self._known[qid] = (mtime, next_due(env))

    def _plan_message(self, qid: str, config: Config, now: float) -> None:
        try:
            env = self.spool.load(qid)
        except SpoolError:
            self._known.pop(qid, None)
            return
        if env.done():
            self._finish(qid)
            return
        with self._lock:
            jobs = plan_jobs(env, config, now, self._busy)
            queued = False
            for job in jobs:
                if self._active.get(job.destination, 0) >= config.core.destination_concurrency:
                    continue
                self._active[job.destination] = self._active.get(job.destination, 0) + 1
                self._busy.update((qid, i) for i in job.indexes)
                self._jobs.put(job)
                queued = True
            pending_idle = any(r.state == PENDING and r.next_attempt <= now and (qid, i) not in self._busy
                               for i, r in enumerate(env.recipients))
        # Due but not started (destination full): look again when a job ends; in flight: due when it ends.
        if queued or pending_idle or any(k[0] == qid for k in self._busy):
            self._known[qid] = (self._known.get(qid, (0, None))[0], now + SCAN_INTERVAL)
        else:
            self._known[qid] = (self._known.get(qid, (0, None))[0], next_due(env))

    # -- delivering

    def _work_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._run(job)
            except Exception:
                log.exception("%s: delivery job failed", job.queue_id)
            finally:
                with self._lock:
                    self._active[job.destination] -= 1
                    if not self._active[job.destination]:
                        del self._active[job.destination]
                    self._busy.difference_update((job.queue_id, i) for i in job.indexes)
                    self._dirty.add(job.queue_id)
                self._wake.set()

    def _run(self, job: Job) -> None:
        config = self.config_source()
        try:
            env = self.spool.load(job.queue_id)
        except SpoolError:
            return
        recipients = [env.recipients[i] for i in job.indexes]
        if any(r.state != PENDING for r in recipients) or env.held:
            return
        with self._lock:
            deadline = self._deadline
        delivery = Delivery(job.queue_id, env, recipients, self.spool.body_path(job.queue_id), config,
                            deadline=deadline)
        started = time.monotonic()
        self.in_flight += 1
        try:
            results = self.mailer(delivery, job.mailer, job.target)
        except Exception as exc:  # a mailer bug defers, it never loses the message
            log.exception("%s: mailer %s failed", job.queue_id, job.target)
            results = [Result(TEMPFAIL, "local error in mailer: %s" % exc)] * len(recipients)
        finally:
            self.in_flight -= 1
        if len(results) != len(recipients):
            results = [Result(TEMPFAIL, "mailer returned %d results for %d recipients"
                              % (len(results), len(recipients)))] * len(recipients)
        self._record(job, results, config, time.monotonic() - started)

    def _record(self, job: Job, results: List[Result], config: Config, elapsed: float) -> None:
        now = self.now()
        try:
            lock = self.spool.lock(job.queue_id)
        except SpoolError:
            return
        with lock:
            try:
                env = self.spool.load(job.queue_id)
            except SpoolError:
                log.info("%s: removed during delivery", job.queue_id)
                return
            newly_bounced: List[Recipient] = []
            for i, result in zip(job.indexes, results):
                r = env.recipients[i]
                if r.state != PENDING:
                    continue
                self._apply(env, r, result, config, now)
                if r.state == BOUNCED:
                    newly_bounced.append(r)
                self._log_result(env, r, result, now)
            self.spool.save(env)
            if newly_bounced:
                self._bounce(env, newly_bounced, config, now)
            if env.done():
                self.spool.remove(job.queue_id)
                log.info("%s: removed", job.queue_id)
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            for result in results:
                metrics.delivery(job.mailer, result.status, elapsed)

    def _apply(self, env: Envelope, r: Recipient, result: Result, config: Config, now: float) -> None:
        r.attempts += 1
        r.last_attempt = now
        if r.first_attempt is None:
            r.first_attempt = now
        r.last_reply = result.reply
        r.dsn_status = result.enhanced
        if result.status == OK:
            r.state = SENT
        elif result.status == PERMFAIL:
            r.state = BOUNCED
        elif now - env.arrival >= config.core.queue_lifetime:
            r.state = BOUNCED
            r.last_reply = "%s (gave up: in queue longer than %ds)" % (result.reply, config.core.queue_lifetime)
            r.dsn_status = "4.4.7" if not r.dsn_status.startswith("5") else r.dsn_status
        else:
            r.next_attempt = now + backoff(r.attempts, config.core.retry_min, config.core.retry_max)

    def _log_result(self, env: Envelope, r: Recipient, result: Result, now: float) -> None:
        status = {SENT: "sent", BOUNCED: "bounced", PENDING: "deferred"}[r.state]
        orig = " orig_to=<%s>" % r.original if r.original and r.original != r.address else ""
        log.info("%s: to=<%s>%s mailer=%s status=%s delay=%.1f (%s)", env.queue_id, r.address, orig, r.target,
                 status, max(0.0, now - env.arrival), r.last_reply)

    # -- bounces

    def _bounce(self, env: Envelope, failed: List[Recipient], config: Config, now: float) -> None:
        qid = send_bounce(self.spool, env, failed, config, self.route_bounce, now)
        if qid:
            self.notify(qid)

    def _finish(self, qid: str) -> None:
        lock = self.spool.try_lock(qid)
        if lock is None:
            return
        with lock:
            try:
                if self.spool.load(qid).done():
                    self.spool.remove(qid)
            except SpoolError:
                pass
        self._known.pop(qid, None)



def send_bounce(spool: Spool, env: Envelope, failed: List[Recipient], config: Config, route_bounce: BounceRouter,
                now: float) -> Optional[str]:
    """Write the report for ``failed`` into the spool; returns its queue id (None when none is due).

    Never to the null sender; a failed report goes once to the local postmaster, never further (SPEC 5).
    """
    if env.to_postmaster:
        log.error("%s: undeliverable report to postmaster dropped", env.queue_id)
        return None
    if env.is_bounce:
        try:
            with spool.open_body(env.queue_id) as f:
                body = f.read()
        except (OSError, SpoolError) as exc:
            log.error("%s: cannot read failed report for postmaster: %s", env.queue_id, exc)
            return None
        qid = _inject(spool, body, route_bounce("postmaster", config), now, to_postmaster=True)
        if qid:
            log.info("%s: undeliverable report sent to postmaster: %s", env.queue_id, qid)
        return qid
    if not env.sender:
        log.info("%s: null sender: no bounce sent", env.queue_id)
        return None
    body = bounces.build_bounce(env, failed, config.core.hostname, spool.body_path(env.queue_id), now)
    qid = _inject(spool, body, route_bounce(env.sender, config), now, to_postmaster=False)
    if qid:
        log.info("%s: sender non-delivery notification: %s", env.queue_id, qid)
    return qid


def _inject(spool: Spool, body: bytes, recipients: List[Recipient], now: float, to_postmaster: bool) -> Optional[str]:
    if not recipients:
        log.error("no route for a non-delivery notification; dropped")
        return None
    try:
        with spool.writer() as w:
            w.write(body)
            env = Envelope(queue_id=w.queue_id, sender="", recipients=recipients, arrival=now, size=len(body),
                           listener="bounce", is_bounce=True, to_postmaster=to_postmaster)
            w.commit(env)
    except SpoolError as exc:
        log.error("cannot store a non-delivery notification: %s", exc)
        return None
    return env.queue_id
