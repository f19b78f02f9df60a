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
  ``touch_trigger(spool)``: tell a running daemon that something outside it changed the spool (the CLI).
Invariants:
  - The spool is the only input; the scheduler never imports routing: bounces are routed by the
    ``route_bounce`` callable the daemon passes in (unnamed ``[route]`` table, ``relay()`` for the rest).
  - A recipient is in at most one job at a time (``busy`` set), so a concurrent ``pmaster queue flush``
    never causes a second delivery. Results are applied under the message lock on a freshly loaded
    envelope and saved durably before the next attempt; a recipient recorded as sent is never retried.
    A job that leaves nothing to do removes the message without saving it first (a crash in between can
    only repeat a delivery that was in progress, which SPEC 5 allows).
  - At most ``destination_limit`` jobs per destination run at once; a job whose destination is full
    waits in the plan, never in a worker, so one dead destination cannot hold every worker. When a job
    ends, the messages waiting for its destination are planned at once (no scan delay), oldest first.
  - A report is queued before the failure that caused it is saved: a crash may repeat a report, never lose it.
  - A temporary failure retries at ``backoff``, but never later than arrival + ``queue-lifetime``; the first
    attempt at or after that time bounces the recipient (DSN status 4.4.7).
  - Mailer sections are looked up by name at delivery time, so a reload applies to queued mail; a
    section that has gone defers the recipient.
  - Work per planning round is proportional to what is due or changed, not to the queue: timed wake-ups
    come from a heap of (due, qid) with lazy deletion; messages are read again only when notified, when a
    job ends, or when a rescan finds their record changed. The whole queue is rescanned at start, on
    ``notify(None)``, when ``<spool>/trigger`` changes (``pmaster queue`` touches it; checked every
    ``TRIGGER_CHECK`` seconds) and every ``FULL_SCAN_INTERVAL`` seconds as a safety net.
Threading: one ``sched`` thread plans and alone touches the heap and ``_known``; ``deliver-N`` threads run
  jobs; state shared between them is under ``_lock``. An envelope handed from one thread to another
  (planning to a job, a recorded result back to planning) is never modified after the hand-over.
"""

import dataclasses
import heapq
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
SCAN_INTERVAL = 2.0  # longest sleep after a planning error
TRIGGER_CHECK = 1.0  # how often the trigger file is looked at (and the longest planner sleep)
FULL_SCAN_INTERVAL = 60.0  # safety net: rescan the whole queue this often even without a trigger
WAITING_RECHECK = 10.0  # a message waiting for a full destination is looked at again after this
TRIGGER_FILE = "trigger"
DRAIN_PER_ROUND = 10000  # waiting messages planned per round at most (the rest in the next round)
MAX_CACHED = 2000  # envelopes kept for messages waiting for a full destination (not read again when it frees)

Stamp = Tuple[int, int, int]  # (st_ino, st_mtime_ns, st_size) of an envelope: a save renames a new file in


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
    # The envelope planning read, and its file's stamp: the worker reads it again only when the record
    # changed since (the CLI held or deleted it). Not part of the job's identity.
    envelope: Optional[Envelope] = dataclasses.field(default=None, compare=False, repr=False)
    stamp: Optional[Stamp] = dataclasses.field(default=None, compare=False, repr=False)


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
    """Group the due, idle, pending recipients of one message into jobs (pure); each job carries ``env``."""
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
            jobs.append(Job(env.queue_id, first.mailer, first.target, dest, tuple(idxs[start:start + size]),
                            envelope=env))
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


def trigger_path(spool: Spool) -> str:
    return os.path.join(spool.directory, TRIGGER_FILE)


def touch_trigger(spool: Spool) -> None:
    """Make ``<spool>/trigger`` newer, so a running daemon rescans the queue within ``TRIGGER_CHECK``.

    The new time is at least one nanosecond past the old one: on a coarse file-system clock two changes in
    one tick would otherwise look like one. A failure only delays the daemon until its safety-net rescan.
    """
    path = trigger_path(spool)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            stamp = max(time.time_ns(), os.fstat(fd).st_mtime_ns + 1)
            os.utime(fd, ns=(stamp, stamp))
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("cannot touch %s: %s (the daemon notices within %ds)", path, exc, FULL_SCAN_INTERVAL)


def _trigger_stamp(spool: Spool) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(trigger_path(spool))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class _Known:
    """What the planner remembers of one message (so it need not read every envelope every round)."""

    stamp: Optional[Stamp]  # of the envelope when it was last read; None: not read yet
    due: Optional[float]  # its entry in the heap; None: nothing scheduled (held, in flight, waiting, planning)
    destinations: FrozenSet[str]  # destinations of its pending recipients (empty: not known yet)


def _env_stamp(spool: Spool, qid: str) -> Stamp:
    """Identity of the envelope file: a changed record (a delivery, ``pmaster queue``) is read again."""
    env_path = getattr(spool, "env_path", None)
    path = env_path(qid) if env_path is not None else spool._path(QUEUE, qid, ENV_SUFFIX)
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


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
        self._jobs_of: Dict[str, int] = {}  # qid -> its jobs planned and not yet ended
        self._active: Dict[str, int] = {}
        # Only the sched thread touches these three.
        self._known: Dict[str, _Known] = {}
        self._heap: List[Tuple[float, str]] = []  # (due, qid); stale when _known[qid].due differs
        self._cache: Dict[str, Tuple[Stamp, Envelope]] = {}  # read for messages now waiting for a destination
        # Under _lock: handed in by notify() and by the workers.
        self._dirty: Set[str] = set()  # read these envelopes again at the next planning round
        self._gone: Set[str] = set()  # removed by a job: forget them
        self._fresh: Dict[str, Tuple[Stamp, Envelope]] = {}  # envelopes just saved by a job, for planning
        self._waiting: Dict[str, Dict[str, None]] = {}  # destination -> messages held back by its limit, oldest first
        self._rescan = True  # a full rescan is wanted (start, notify(None))
        self._threads: List[threading.Thread] = []
        self._stopping = False
        self._deadline: Optional[float] = None
        self._last_full = 0.0
        self._last_trigger_check = 0.0
        self._trigger_seen: Optional[Tuple[int, int, int]] = None
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
                self._rescan = True
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
                with self._lock:
                    self._rescan = True  # the round may have dropped notifications: look at everything
                timeout = SCAN_INTERVAL
            self._wake.wait(timeout)
            self._wake.clear()

    def _plan_once(self) -> float:
        config = self.config_source()
        now = self.now()
        if self._rescan_wanted(time.monotonic()):
            self._scan(now)
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            gone, self._gone = self._gone, set()
        for qid in gone:
            self._forget(qid)
        for qid in dirty - gone:
            self._cache.pop(qid, None)  # changed: read it again (or take what its job handed back)
            self._make_due(qid, now)
        limit = destination_limit(config)
        self._plan_due(config, now, limit)
        self._drain_waiting(config, now, limit)
        return self._next_wait(now)

    def _rescan_wanted(self, mono: float) -> bool:
        """A full rescan at start, on notify(None), when the trigger file changed, and every minute."""
        with self._lock:
            forced, self._rescan = self._rescan, False
        if not forced and mono - self._last_full < FULL_SCAN_INTERVAL:
            if mono - self._last_trigger_check < TRIGGER_CHECK:
                return False
            self._last_trigger_check = mono
            stamp = _trigger_stamp(self.spool)
            if stamp == self._trigger_seen:
                return False
        else:
            stamp = _trigger_stamp(self.spool)
        # Looked at before the scan: a change made after this point touches the trigger again.
        self._trigger_seen = stamp
        self._last_full = self._last_trigger_check = mono
        return True

    def _scan(self, now: float) -> None:
        """Compare every envelope's stamp with what we know; new and changed messages are planned now."""
        try:
            present = self.spool.ids()
        except SpoolError as exc:
            log.error("cannot scan the queue: %s", exc)
            return
        seen = set(present)
        for qid in [q for q in self._known if q not in seen]:
            self._forget(qid)
        for qid in present:
            try:
                stamp = _env_stamp(self.spool, qid)
            except (OSError, SpoolError):
                self._forget(qid)
                continue
            info = self._known.get(qid)
            if info is None or info.stamp != stamp:
                self._cache.pop(qid, None)
                self._make_due(qid, now)  # planning reads it (once), not the scan

    def _forget(self, qid: str) -> None:
        self._known.pop(qid, None)  # its heap entries go stale
        self._cache.pop(qid, None)
        with self._lock:
            self._fresh.pop(qid, None)

    def _set_due(self, qid: str, info: _Known, due: Optional[float]) -> None:
        """Keep the invariant: ``info.due`` is not None exactly when a heap entry (due, qid) is valid."""
        if due == info.due:
            return
        info.due = due
        if due is not None:
            heapq.heappush(self._heap, (due, qid))

    def _make_due(self, qid: str, now: float) -> None:
        info = self._known.get(qid)
        if info is None:
            info = self._known[qid] = _Known(None, None, frozenset())
        self._set_due(qid, info, now if info.due is None else min(info.due, now))

    def _plan_due(self, config: Config, now: float, limit: int) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, qid = heapq.heappop(heap)
            info = self._known.get(qid)
            if info is None or info.due != due:
                continue  # stale: the message changed its time or is gone
            info.due = None  # consumed; planning sets the next one
            if info.destinations and self._all_full(qid, info.destinations, limit):
                continue  # planned again when one of its destinations has room
            self._plan_message(qid, config, now, limit)

    def _drain_waiting(self, config: Config, now: float, limit: int) -> None:
        """Plan waiting messages, oldest first, for every destination that has room again."""
        for _ in range(DRAIN_PER_ROUND):
            qid = self._next_waiting(limit)
            if qid is None:
                return
            if qid in self._known:
                self._plan_message(qid, config, now, limit)
        self._wake.set()  # more to do: go on in the next round

    def _next_waiting(self, limit: int) -> Optional[str]:
        with self._lock:
            for dest, waiters in self._waiting.items():
                if self._active.get(dest, 0) >= limit:
                    continue
                qid = next(iter(waiters))
                del waiters[qid]
                if not waiters:
                    del self._waiting[dest]
                return qid
        return None

    def _next_wait(self, now: float) -> float:
        heap, known = self._heap, self._known
        if len(heap) > 2 * len(known) + 1024:
            # Too many stale entries: rebuild from what is valid.
            self._heap = heap = [(i.due, q) for q, i in known.items() if i.due is not None]
            heapq.heapify(heap)
        while heap:
            due, qid = heap[0]
            info = known.get(qid)
            if info is not None and info.due == due:
                break
            heapq.heappop(heap)
        wait = TRIGGER_CHECK
        if heap:
            wait = min(wait, heap[0][0] - now)
        return max(0.05, wait)

    def _all_full(self, qid: str, destinations: FrozenSet[str], limit: int) -> bool:
        """True (and ``qid`` registered as waiting) when every destination it needs is at its limit."""
        with self._lock:
            if any(self._active.get(d, 0) < limit for d in destinations):
                return False
            for d in destinations:
                self._waiting.setdefault(d, {})[qid] = None
            return True

    def _read(self, qid: str) -> Optional[Tuple[Stamp, Envelope]]:
        """The envelope and its stamp, read from the spool only when planning has no current copy.

        Current copies are the one a job just saved, and the one kept while the message waited for a
        destination. Both are dropped when the record changes in the daemon (``notify``, a job's end) or
        outside it (a rescan sees another stamp); a job whose record changed after planning reads it again
        before delivering (``_job_envelope``), so a copy planned from in the meantime never delivers
        a held or deleted message.
        """
        with self._lock:
            fresh = self._fresh.pop(qid, None)
        cached = self._cache.pop(qid, None)
        if fresh is not None:
            return fresh
        if cached is not None:
            return cached
        try:
            stamp = _env_stamp(self.spool, qid)  # before reading: a change in between reads again later
        except (OSError, SpoolError):
            return None
        try:
            return stamp, self.spool.load(qid)
        except SpoolError as exc:
            if not isinstance(exc, QueueIdError):
                log.error("%s: %s", qid, exc)  # load() moved it to corrupt/: it never stops the scheduler
            return None

    def _plan_message(self, qid: str, config: Config, now: float, limit: int) -> None:
        got = self._read(qid)
        if got is None:
            self._forget(qid)
            return
        stamp, env = got
        if env.done():
            # A finished record left behind (a crash between saving and removing): remove it now.
            if not self._finish(qid):
                self._make_due(qid, now + TRIGGER_CHECK)  # someone holds its lock: look again soon
            return
        waits = False
        with self._lock:
            jobs = plan_jobs(env, config, now, self._busy)
            for job in jobs:
                if self._active.get(job.destination, 0) >= limit:
                    self._waiting.setdefault(job.destination, {})[qid] = None
                    waits = True
                    continue
                self._active[job.destination] = self._active.get(job.destination, 0) + 1
                self._jobs_of[qid] = self._jobs_of.get(qid, 0) + 1
                self._busy.update((qid, i) for i in job.indexes)
                self._jobs.put(dataclasses.replace(job, stamp=stamp))
            in_flight = qid in self._jobs_of
            due_idle = [r.next_attempt for i, r in enumerate(env.recipients)
                        if r.state == PENDING and (qid, i) not in self._busy]
        # Recipients in flight make the message dirty when their job ends; those held back by a full
        # destination are planned when it has room; the rest are due at their own time.
        future = [t for t in due_idle if t > now]
        due = min(future) if future else None
        if env.held:
            due = None
        if due is None and not in_flight and not env.held and due_idle:
            due = now + WAITING_RECHECK  # safety net: never forget a message
        info = self._known.get(qid)
        if info is None:
            info = self._known[qid] = _Known(stamp, None, frozenset())
        info.stamp = stamp
        info.destinations = _pending_destinations(env)
        self._set_due(qid, info, due)
        if waits and len(self._cache) < MAX_CACHED:
            self._cache[qid] = (stamp, env)  # planned again as soon as the destination has room

    # -- delivering

    def _work_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            gone = False
            try:
                gone = self._run(job)
            except Exception:
                log.exception("%s: delivery job failed", job.queue_id)
            finally:
                self._job_done(job, gone)

    def _job_done(self, job: Job, gone: bool) -> None:
        qid = job.queue_id
        with self._lock:
            self._active[job.destination] -= 1
            if not self._active[job.destination]:
                del self._active[job.destination]
            left = self._jobs_of.get(qid, 1) - 1
            if left:
                self._jobs_of[qid] = left
            else:
                self._jobs_of.pop(qid, None)
            self._busy.difference_update((qid, i) for i in job.indexes)
            # Planning looks at the message again, and at the messages waiting for this destination.
            if gone:
                self._gone.add(qid)
            else:
                self._dirty.add(qid)
        self._wake.set()

    def _job_envelope(self, job: Job) -> Optional[Envelope]:
        """The envelope planning read, unless the record has changed since (then read it again)."""
        try:
            stamp = _env_stamp(self.spool, job.queue_id)
        except (OSError, SpoolError):
            return None
        if job.envelope is not None and stamp == job.stamp:
            return job.envelope
        try:
            return self.spool.load(job.queue_id)
        except SpoolError:
            return None

    def _run(self, job: Job) -> bool:
        """Deliver one job and record the results; True when the message is gone from the spool."""
        config = self.config_source()
        env = self._job_envelope(job)
        if env is None:
            return not self.spool.exists(job.queue_id)
        recipients = [env.recipients[i] for i in job.indexes]
        if any(r.state != PENDING for r in recipients) or env.held:
            return False
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
        return self._record(job, results, config, time.monotonic() - started)

    def _record(self, job: Job, results: List[Result], config: Config, elapsed: float) -> bool:
        """Apply a job's results to a fresh copy of the envelope and save it before anything else happens.

        Returns True when the message is gone from the spool.
        """
        now = self.now()
        qid = job.queue_id
        try:
            lock = self.spool.lock(qid)
        except SpoolError:
            return not self.spool.exists(qid)
        with lock:
            try:
                env = self.spool.load(qid)
            except SpoolError:
                log.info("%s: removed during delivery", qid)
                return not self.spool.exists(qid)
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
            if env.done() and not newly_bounced and self._remove(qid):
                return True  # nothing left to record: no save first (durable removal is enough)
            # The report is queued before the failure is recorded: a crash in between can only repeat the
            # report, never lose it.
            if newly_bounced:
                self._bounce(env, newly_bounced, config, now)
            try:
                self.spool.save(env)
            except SpoolError as exc:
                log.error("%s: cannot record delivery results: %s", qid, exc)
                return False
            if env.done():
                return self._remove(qid)
            self._hand_back(env)
        return False

    def _remove(self, qid: str) -> bool:
        try:
            self.spool.remove(qid)
        except SpoolError as exc:
            log.error("%s: cannot remove delivered message: %s", qid, exc)
            return False
        log.info("%s: removed", qid)
        return True

    def _hand_back(self, env: Envelope) -> None:
        """Give the envelope just saved to planning, so it need not read it again."""
        try:
            stamp = _env_stamp(self.spool, env.queue_id)
        except (OSError, SpoolError):
            return
        with self._lock:
            self._fresh[env.queue_id] = (stamp, env)

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

    def _finish(self, qid: str) -> bool:
        """Remove a message found finished; False when its lock is taken (try again later)."""
        lock = self.spool.try_lock(qid)
        if lock is None:
            return False
        with lock:
            try:
                if self.spool.load(qid).done():
                    self.spool.remove(qid)
                    log.info("%s: removed", qid)
            except SpoolError:
                pass
        self._forget(qid)
        return True


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
