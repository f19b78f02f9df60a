"""Scheduler: drains the spool with a pool of delivery workers, retries with backoff, bounces, expires.

API:
  ``backoff(attempts, retry_min, retry_max) -> seconds``: pure; ``retry_min * 2**(attempts-1)`` capped.
  ``Scheduler(config_source, spool, mailer, route_bounce, now=time.time)``: ``start()``, ``notify(qid)`` (a new
     or changed message; None rescans the spool), ``stop(deadline)`` (finish or abandon deliveries in progress
     by ``deadline``), ``in_flight`` (mailer calls running), ``idle()``.
  ``plan_jobs(env, config, now, busy)``: pure grouping of due recipients into delivery jobs: pipe batches of
     up to ``max_rcpt_to``, relay batches of up to 100 per destination, ``relay()`` per recipient domain.
  ``destination_limit(config)``: jobs per destination at once: ``destination-concurrency``, at most
     ``workers - 1`` (so one worker is always free for other destinations).
  ``send_bounce(spool, env, failed, config, route_bounce, now)``: queue the report (also used by the CLI).
Invariants:
  - The spool is the only input; the scheduler never imports routing: bounces are routed by the
    ``route_bounce`` callable the daemon passes in (unnamed ``[route]`` table, ``relay()`` for the rest).
  - A recipient is in at most one job at a time (``busy`` set), so a concurrent ``pmaster queue flush``
    never causes a second delivery. Results are applied under the message lock on a freshly loaded
    envelope and saved durably before the next attempt; a recipient recorded as sent is never retried.
  - At most ``destination_limit`` jobs per destination run at once; a job whose destination is full
    waits in the plan, never in a worker, so one dead destination cannot hold every worker. When a job
    ends, the messages waiting for its destination are planned at once (no scan delay).
  - A report is queued before the failure that caused it is saved: a crash may repeat a report, never lose it.
  - A temporary failure retries at ``backoff``, but never later than arrival + ``queue-lifetime``; the first
    attempt at or after that time bounces the recipient (DSN status 4.4.7).
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
from typing import Callable, Dict, FrozenSet, List, Optional, Set, Tuple

from pmaster import bounce as bounces
from pmaster.config import Config
from pmaster.envelope import BOUNCED, PENDING, SENT, Envelope, Recipient, split_address
from pmaster.errors import QueueIdError, SpoolError
from pmaster.mailers import OK, PERMFAIL, TEMPFAIL, Delivery, Result
from pmaster.spool import ENV_SUFFIX, QUEUE, Spool

log = logging.getLogger("pmaster.scheduler")

RELAY_BATCH = 100
STATUS_WORDS = {SENT: "sent", BOUNCED: "bounced", PENDING: "deferred"}
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


def destination_limit(config: Config) -> int:
    """Jobs one destination may run at once: ``destination-concurrency``, but never every worker.

    With a single worker there is nothing to keep free; otherwise one worker always stays available for
    other destinations, so one dead destination cannot hold the whole pool (SPEC 5).
    """
    workers = config.core.workers
    limit = config.core.destination_concurrency
    return max(1, min(limit, workers - 1)) if workers > 1 else 1


def _pending_destinations(env: Envelope) -> FrozenSet[str]:
    return frozenset(destination_of(r) for r in env.recipients if r.state == PENDING)


@dataclass
class _Known:
    """What the planner remembers of one message between scans (so it need not reload every envelope)."""

    mtime: int  # st_mtime_ns of the envelope when it was read
    due: Optional[float]  # None: nothing to do (held, or in flight with nothing else pending)
    destinations: FrozenSet[str]  # destinations of its pending recipients


def _env_mtime(spool: Spool, qid: str) -> int:
    """The envelope's st_mtime_ns: a changed record (a delivery, ``pmaster queue``) is read again."""
    env_path = getattr(spool, "env_path", None)
    path = env_path(qid) if env_path is not None else spool._path(QUEUE, qid, ENV_SUFFIX)
    return os.stat(path).st_mtime_ns


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
        self._known: Dict[str, _Known] = {}  # only the sched thread touches it
        self._dirty: Set[str] = set()  # reload these envelopes at the next planning round
        self._kick: Set[str] = set()  # plan these now: a destination they wait for has room again
        self._waiting: Dict[str, Set[str]] = {}  # destination -> messages due but held back by its limit
        self._threads: List[threading.Thread] = []
        self._stopping = False
        self._deadline: Optional[float] = None
        self._last_scan = 0.0
        self._in_flight = 0
        self.metrics = None  # set by the daemon: has delivery(mailer, sent|deferred|bounced, seconds)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

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
        """A message was queued or changed (``qid``), or anything may have changed (None: rescan)."""
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
        with self._lock:
            rescan = mono - self._last_scan >= SCAN_INTERVAL
            if rescan:
                self._last_scan = mono
        if rescan:
            self._scan()
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            kick, self._kick = self._kick, set()
        for qid in dirty:
            self._refresh(qid)
        for qid in kick:
            info = self._known.get(qid)
            if info is not None:
                info.due = now if info.due is None else min(info.due, now)
        wait = SCAN_INTERVAL
        limit = destination_limit(config)
        for qid, info in sorted(self._known.items()):
            if info.due is None:
                continue
            if info.due > now:
                wait = min(wait, info.due - now)
                continue
            if info.destinations and self._all_full(qid, info.destinations, limit):
                info.due = None  # woken through _kick when one of its destinations has room
                continue
            self._plan_message(qid, config, now, limit)
        return max(0.05, wait)

    def _all_full(self, qid: str, destinations: FrozenSet[str], limit: int) -> bool:
        """True (and ``qid`` registered as waiting) when every destination it needs is at its limit."""
        with self._lock:
            if any(self._active.get(d, 0) < limit for d in destinations):
                return False
            for d in destinations:
                self._waiting.setdefault(d, set()).add(qid)
            return True

    def _scan(self) -> None:
        try:
            present = set(self.spool.ids())
        except SpoolError as exc:
            log.error("cannot scan the queue: %s", exc)
            return
        for qid in list(self._known):
            if qid not in present:
                del self._known[qid]
        for qid in sorted(present):
            self._refresh(qid)

    def _refresh(self, qid: str) -> None:
        try:
            mtime = _env_mtime(self.spool, qid)
        except (OSError, SpoolError):
            self._known.pop(qid, None)
            return
        known = self._known.get(qid)
        if known is not None and known.mtime == mtime:
            return
        try:
            env = self.spool.load(qid)
        except QueueIdError:
            self._known.pop(qid, None)
            return
        except SpoolError as exc:
            log.error("%s: %s", qid, exc)  # load() moved it to corrupt/: it never stops the scheduler
            self._known.pop(qid, None)
            return
        # A finished record left behind (a crash between saving and removing) is due for removal now.
        due = self.now() if env.done() else next_due(env)
        self._known[qid] = _Known(mtime, due, _pending_destinations(env))

    def _plan_message(self, qid: str, config: Config, now: float, limit: int) -> None:
        try:
            env = self.spool.load(qid)
        except SpoolError as exc:
            if not isinstance(exc, QueueIdError):
                log.error("%s: %s", qid, exc)
            self._known.pop(qid, None)
            return
        if env.done():
            self._finish(qid)
            return
        with self._lock:
            jobs = plan_jobs(env, config, now, self._busy)
            for job in jobs:
                if self._active.get(job.destination, 0) >= limit:
                    self._waiting.setdefault(job.destination, set()).add(qid)
                    continue
                self._active[job.destination] = self._active.get(job.destination, 0) + 1
                self._busy.update((qid, i) for i in job.indexes)
                self._jobs.put(job)
            in_flight = any(k[0] == qid for k in self._busy)
            due_idle = [r.next_attempt for i, r in enumerate(env.recipients)
                        if r.state == PENDING and (qid, i) not in self._busy]
        info = self._known.get(qid)
        mtime = info.mtime if info is not None else 0
        # Recipients in flight make the message dirty when their job ends; those held back by a full
        # destination are kicked when it has room; the rest are due at their own time.
        future = [t for t in due_idle if t > now]
        due = min(future) if future else None
        if env.held:
            due = None
        if due is None and not in_flight and not env.held and due_idle:
            due = now + SCAN_INTERVAL  # safety net: never forget a message
        self._known[qid] = _Known(mtime, due, _pending_destinations(env))

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
                self._job_done(job)

    def _job_done(self, job: Job) -> None:
        with self._lock:
            self._active[job.destination] -= 1
            if not self._active[job.destination]:
                del self._active[job.destination]
            self._busy.difference_update((job.queue_id, i) for i in job.indexes)
            self._dirty.add(job.queue_id)
            self._kick.update(self._waiting.pop(job.destination, ()))
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
            self._in_flight += 1
        delivery = Delivery(job.queue_id, env, recipients, self.spool.body_path(job.queue_id), config,
                            deadline=deadline)
        started = time.monotonic()
        try:
            results = self.mailer(delivery, job.mailer, job.target)
        except Exception as exc:  # a mailer bug defers, it never loses the message
            log.exception("%s: mailer %s failed", job.queue_id, job.target)
            results = [Result(TEMPFAIL, "local error in mailer: %s" % exc)] * len(recipients)
        finally:
            with self._lock:
                self._in_flight -= 1
        if len(results) != len(recipients):
            results = [Result(TEMPFAIL, "mailer returned %d results for %d recipients"
                              % (len(results), len(recipients)))] * len(recipients)
        self._record(job, results, config, time.monotonic() - started)

    def _record(self, job: Job, results: List[Result], config: Config, elapsed: float) -> None:
        """Apply a job's results to a fresh copy of the envelope and save it before anything else happens."""
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
                self._log_result(env, r, now)
                if self.metrics is not None:
                    self.metrics.delivery(job.mailer, STATUS_WORDS[r.state], elapsed)
            # The report is queued before the failure is recorded: a crash in between can only repeat the
            # report, never lose it.
            if newly_bounced:
                self._bounce(env, newly_bounced, config, now)
            try:
                self.spool.save(env)
            except SpoolError as exc:
                log.error("%s: cannot record delivery results: %s", job.queue_id, exc)
                return
            if env.done():
                self.spool.remove(job.queue_id)
                log.info("%s: removed", job.queue_id)

    def _apply(self, env: Envelope, r: Recipient, result: Result, config: Config, now: float) -> None:
        r.attempts += 1
        r.last_attempt = now
        if r.first_attempt is None:
            r.first_attempt = now
        r.last_reply = result.reply
        r.dsn_status = result.enhanced
        expires = env.arrival + config.core.queue_lifetime
        if result.status == OK:
            r.state = SENT
        elif result.status == PERMFAIL:
            r.state = BOUNCED
        elif now >= expires:
            r.state = BOUNCED
            r.last_reply = "%s (gave up: in queue longer than %ds)" % (result.reply, config.core.queue_lifetime)
            r.dsn_status = "4.4.7" if not r.dsn_status.startswith("5") else r.dsn_status
        else:
            # The last retry falls on the expiry time, so a message never waits past its lifetime.
            r.next_attempt = min(now + backoff(r.attempts, config.core.retry_min, config.core.retry_max), expires)

    def _log_result(self, env: Envelope, r: Recipient, now: float) -> None:
        # SPEC 7: "QUEUEID: to=<...> mailer=NAME status=sent|deferred|bounced delay=S (reply)".
        status = STATUS_WORDS[r.state]
        log.info("%s: to=<%s> mailer=%s status=%s delay=%.1f (%s)", env.queue_id, r.address, r.target,
                 status, max(0.0, now - env.arrival), r.last_reply)
        if r.original and r.original != r.address:
            log.debug("%s: to=<%s> was given as <%s>", env.queue_id, r.address, r.original)

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
                    log.info("%s: removed", qid)
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
