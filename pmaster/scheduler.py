"""Scheduler: drains the spool with a pool of delivery workers, retries with backoff, bounces, expires.

API:
  ``backoff(attempts, retry_min, retry_max) -> seconds``: pure; ``retry_min * 2**(attempts-1)`` capped.
  ``Scheduler(config_source, spool, mailer, route_bounce, now=time.time)``: ``start()``,
     ``notify(qid, fresh)`` (a new or changed message, optionally with (stamp, envelope) as just written;
     None rescans the spool), ``stop(deadline)`` (finish or abandon deliveries in progress by ``deadline``;
     jobs not started yet are not started), ``in_flight`` (mailer calls running), ``queued_jobs`` (planned,
     waiting for a worker or in a destination's ready line), ``idle()``.
  ``plan_jobs(env, config, now, busy, stamp=None)``: pure grouping of due recipients into delivery jobs: pipe batches of
     up to ``max_rcpt_to``, relay batches of up to 100 per destination, ``relay()`` per recipient domain.
  ``destination_limit(config)``: jobs per destination at once: ``destination-concurrency``, at most
     ``workers - 1`` (so one worker is always free for other destinations).
  ``send_bounce(spool, env, failed, config, route_bounce, now)``: queue the report (also used by the CLI);
     ``SpoolError`` when a report was due and could not be stored.
  ``touch_trigger(spool)``, ``trigger_path(spool)``: thin wrappers of ``Spool.touch_trigger``/``trigger_path``.
Invariants:
  - The spool is the only input; the scheduler never imports routing: bounces are routed by the
    ``route_bounce`` callable the daemon passes in (unnamed ``[route]`` table, ``relay()`` for the rest).
  - A recipient is in at most one job at a time (``busy`` set), so a concurrent ``pmaster queue flush``
    never causes a second delivery. Results are applied under the message lock on a freshly loaded
    envelope and saved durably before the next attempt; a recipient recorded as sent is never retried.
    A job that leaves nothing to do removes the message without saving it first (a crash in between can
    only repeat a delivery that was in progress, which SPEC 5 allows).
  - Results that cannot be saved (the save fails, or the message lock stays taken for ``RECORD_LOCK_WAIT``,
    say by a suspended ``pmaster queue``) are kept in memory and their recipients stay busy: the record on
    disk still says "pending, due", and planning from it would deliver them again at once. Planning retries
    only the save (applied to a fresh copy of the record, at ``backoff`` capped at ``SAVE_RETRY_MAX``,
    one log line per failed try) and once more at ``stop``; only then are the recipients planned again.
  - At most ``destination_limit`` jobs per destination run at once; a job whose destination is full
    waits in the plan, never in a worker, so one dead destination cannot hold every worker. Up to
    ``READY_PER_DESTINATION`` such jobs are planned ahead in the destination's ready line (their
    recipients busy, as in any job): the worker that ends a job of that destination starts the next one
    from there at once, without waiting for a planning round. Beyond that, messages wait by id; when a
    job ends they are planned at once (no scan delay), oldest first, and before messages newly due, so a
    busy destination is served in arrival order.
  - A report is queued before the failure that caused it is saved: a crash may repeat a report, never lose it.
    A report that is due and cannot be stored (disk full) leaves its recipients pending, deferred at
    ``backoff`` with the reason in ``last_reply``: the failure is recorded only with its report.
  - A temporary failure retries at ``backoff``, but never later than arrival + ``queue-lifetime``; the first
    attempt at or after that time bounces the recipient (DSN status 4.4.7).
  - After ``stop`` no job starts: jobs still queued are dropped (their recipients stay due for the next start);
    only deliveries in progress finish (SPEC 7).
  - Mailer sections are looked up by name at delivery time, so a reload applies to queued mail; a
    section that has gone defers the recipient.
  - Work per planning round is proportional to what is due or changed, not to the queue: timed wake-ups
    come from a heap of (due, qid) with lazy deletion; messages are read again only when notified, when a
    job ends, or when a rescan finds their record changed. The whole queue is rescanned at start, on
    ``notify(None)``, when ``<spool>/trigger`` changes (``pmaster queue`` touches it; checked every
    ``TRIGGER_CHECK`` seconds) and every ``FULL_SCAN_INTERVAL`` seconds as a safety net.
Threading: one ``sched`` thread plans, alone touches the heap and ``_known``, and alone saves kept results;
  ``deliver-N`` threads run jobs; state shared between them (``_busy``, ``_unsaved``, ...) is under ``_lock``.
  An envelope or recipient handed from one thread to another (planning to a job, a recorded or kept result
  back to planning) is never modified after the hand-over.
"""

import collections
import copy
import dataclasses
import heapq
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Deque, Dict, FrozenSet, List, Optional, Set, Tuple

from pmaster import bounce as bounces
from pmaster import sanitize
from pmaster.config import Config
from pmaster.envelope import BOUNCED, PENDING, SENT, Envelope, Recipient, split_address
from pmaster.errors import QueueIdError, SpoolError
from pmaster.mailers import OK, PERMFAIL, TEMPFAIL, Delivery, Result
from pmaster.spool import Spool, SpoolLock

log = logging.getLogger("pmaster.scheduler")

RELAY_BATCH = 100
STATUS_WORDS = {SENT: "sent", BOUNCED: "bounced", PENDING: "deferred"}
SCAN_INTERVAL = 2.0  # longest sleep after a planning error
TRIGGER_CHECK = 1.0  # how often the trigger file is looked at (and the longest planner sleep)
FULL_SCAN_INTERVAL = 60.0  # safety net: rescan the whole queue this often even without a trigger
WAITING_RECHECK = 10.0  # a message waiting for a full destination is looked at again after this
RECORD_LOCK_WAIT = 60.0  # longest wait for a message lock to record results (then kept, saved later)
SAVE_RETRY_MAX = 60  # longest wait (seconds of ``now``) between tries to save results kept in memory
DRAIN_PER_ROUND = 10000  # waiting messages planned per round at most (the rest in the next round)
COALESCE = 0.005  # after a wake-up, wait this long for more notifications before planning
# Jobs planned ahead per full destination. A job's end starts the next from here in the same worker:
# waiting for the planner instead (a wake-up, COALESCE, a round under the GIL) kept workers idle for
# three quarters of the time while a queue for one destination drained.
READY_PER_DESTINATION = 10
MAX_CACHED = 2000  # envelopes kept for messages waiting for a full destination (not read again when it frees)

Stamp = Tuple[int, int, int, int]  # ``Spool.stamp``: which envelope version (a save renames a new file in)

# What a job left behind, for ``_job_done``: (what, indexes whose results are kept in memory).
RELEASED = "released"  # recorded (or nothing to record): its recipients may be planned again
GONE = "gone"  # the message is no longer in the spool
KEPT = "kept"  # results kept in memory (``_Unsaved``): those recipients stay busy until saved
Outcome = Tuple[str, FrozenSet[int]]
_RELEASED: Outcome = (RELEASED, frozenset())
_GONE: Outcome = (GONE, frozenset())


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


def plan_jobs(env: Envelope, config: Config, now: float, busy: Set[Tuple[str, int]],
              stamp: Optional[Stamp] = None) -> List[Job]:
    """Group the due, idle, pending recipients of one message into jobs (pure); each job carries ``env``
    and the ``stamp`` of the record it was read from."""
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
                            envelope=env, stamp=stamp))
    return jobs


def next_due(env: Envelope) -> Optional[float]:
    if env.held:
        return None
    due = [r.next_attempt for r in env.recipients if r.state == PENDING]
    return min(due) if due else None


def _save_delay(failures: int, config: Config) -> int:
    """Seconds before the next try to save kept results: ``backoff``, but at most ``SAVE_RETRY_MAX``."""
    return max(1, min(SAVE_RETRY_MAX, backoff(failures, config.core.retry_min, config.core.retry_max)))


def destination_limit(config: Config) -> int:
    """Jobs one destination may run at once: ``destination-concurrency``, but never every worker.

    With a single worker there is nothing to keep free; otherwise one worker always stays available for
    other destinations, so one dead destination cannot hold the whole pool (SPEC 5).
    """
    workers = config.core.workers
    limit = config.core.destination_concurrency
    return max(1, min(limit, workers - 1)) if workers > 1 else 1


def _ready_destinations(env: Envelope, now: float, busy: Set[Tuple[str, int]]) -> Set[str]:
    """Destinations of the recipients ``plan_jobs`` would put in jobs now (pending, due, not busy)."""
    qid = env.queue_id
    return {destination_of(r) for i, r in enumerate(env.recipients)
            if r.state == PENDING and r.next_attempt <= now and (qid, i) not in busy}


def _pending_destinations(env: Envelope) -> FrozenSet[str]:
    return frozenset(destination_of(r) for r in env.recipients if r.state == PENDING)


def trigger_path(spool: Spool) -> str:
    return spool.trigger_path()


def touch_trigger(spool: Spool) -> None:
    """Tell a running daemon to rescan the queue within ``TRIGGER_CHECK`` (see ``Spool.touch_trigger``)."""
    spool.touch_trigger()


def _trigger_stamp(spool: Spool) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(spool.trigger_path())
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class _Known:
    """What the planner remembers of one message (so it need not read every envelope every round)."""

    stamp: Optional[Stamp]  # of the envelope when it was last read; None: not read yet
    due: Optional[float]  # its entry in the heap; None: nothing scheduled (held, in flight, waiting, planning)
    destinations: FrozenSet[str]  # destinations of its pending recipients (empty: not known yet)


@dataclass
class _Unsaved:
    """Results of finished deliveries of one message that could not be saved yet (under ``_lock``)."""

    recipients: Dict[int, Recipient]  # index -> the recipient with its result applied; busy until saved
    failures: int  # failed tries to save so far
    due: float  # ``now`` time of the next try


def _env_stamp(spool: Spool, qid: str) -> Stamp:
    """Identity of the envelope file: a changed record (a delivery, ``pmaster queue``) is read again."""
    return spool.stamp(qid)


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
        self._ready: Dict[str, Deque[Job]] = {}  # destination -> jobs planned for when it has room, in order
        self._waiting: Dict[str, Dict[str, None]] = {}  # destination -> messages held back by its limit, oldest first
        self._unsaved: Dict[str, _Unsaved] = {}  # qid -> results not saved yet (workers add, planning saves)
        self._rescan = True  # a full rescan is wanted (start, notify(None))
        self._threads: List[threading.Thread] = []
        self._stopping = False
        self._deadline: Optional[float] = None
        self._last_full = 0.0
        self._last_trigger_check = 0.0
        self._trigger_seen: Optional[Tuple[int, int, int]] = None
        self._flush_seen: Optional[Tuple[int, int, int]] = None
        self.on_flush: Callable[[], object] = lambda: None  # the daemon: forget the relay's refused hosts
        self._in_flight = 0
        self._limit = destination_limit(config_source())  # per destination; planning updates it each round
        self.metrics = None  # set by the daemon: has delivery(mailer, sent|deferred|bounced, seconds)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def queued_jobs(self) -> int:
        """Jobs planned and waiting for a worker (or for room at their destination)."""
        with self._lock:
            ready = sum(len(line) for line in self._ready.values())
        return self._jobs.qsize() + ready

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

    def notify(self, qid: Optional[str] = None, fresh: Optional[Tuple[Stamp, Envelope]] = None) -> None:
        """A message was queued or changed (``qid``), or anything may have changed (None: rescan).

        ``fresh`` is (stamp, envelope) of the record just written, so planning need not read it back; the
        caller never modifies that envelope again.
        """
        with self._lock:
            if qid is not None:
                self._dirty.add(qid)
                if fresh is not None:
                    self._fresh[qid] = fresh
            else:
                self._rescan = True
        # Set already: the planner clears it before the round that swaps _dirty, which sees this message.
        if not self._wake.is_set():
            self._wake.set()

    def stop(self, deadline: float) -> None:
        """Stop planning; deliveries in progress get until ``deadline`` (time.monotonic) to finish."""
        with self._lock:
            self._stopping = True
            self._deadline = deadline
            for line in self._ready.values():  # never started: their recipients stay due on disk
                for job in line:
                    self._release(job)
            self._ready.clear()
        self._wake.set()
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()) + 1.0)
        if self._threads and not self._threads[0].is_alive():  # the sched thread: saves kept results
            self._save_unsaved(self.config_source(), self.now(), final=True)

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
            if self._wake.wait(timeout):
                # Woken by a notify or a job's end: let more of them arrive so one round plans them all
                # (each round and each wake-up costs GIL hand-offs under load).
                time.sleep(COALESCE)
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
        self._save_unsaved(config, now)  # saved results free their recipients for the next round
        limit = destination_limit(config)
        with self._lock:
            self._limit = limit
            self._start_ready(limit)  # a reload may have raised the limit
        # Messages that waited for room go first, then what is newly due: first come, first served.
        self._drain_waiting(config, now, limit)
        self._plan_due(config, now, limit)
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
        self._check_flush()
        return True

    def _check_flush(self) -> None:
        """SPEC 9: a flush forgets which hosts refused connections, before the flushed mail is planned."""
        try:
            st = os.stat(self.spool.flush_path())
        except OSError:
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        if stamp != self._flush_seen:
            self._flush_seen = stamp  # at start too: nothing is remembered then, so forgetting costs nothing
            log.info("queue flushed: refused hosts are tried again")
            self.on_flush()

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

    def _has_room(self, destination: str, limit: int) -> bool:
        """A job for ``destination`` could start now or join its ready line (``_lock`` held)."""
        if self._active.get(destination, 0) < limit:
            return True
        line = self._ready.get(destination)
        return line is None or len(line) < READY_PER_DESTINATION

    def _place(self, job: Job, limit: int) -> bool:
        """Start ``job`` or put it in its destination's ready line; False when neither has room (``_lock`` held)."""
        dest = job.destination
        if self._stopping:
            return False
        if not self._has_room(dest, limit):
            return False
        # Through the line, so jobs planned earlier start first (it is empty unless the limit was raised).
        self._ready.setdefault(dest, collections.deque()).append(job)
        self._start_ready(limit, dest)
        qid = job.queue_id
        self._jobs_of[qid] = self._jobs_of.get(qid, 0) + 1
        self._busy.update((qid, i) for i in job.indexes)
        return True

    def _start_ready(self, limit: int, only: Optional[str] = None) -> None:
        """Start jobs from the head of ready lines while their destination has room (``_lock`` held)."""
        for dest in [only] if only is not None else list(self._ready):
            line = self._ready.get(dest)
            while line and self._active.get(dest, 0) < limit:
                self._active[dest] = self._active.get(dest, 0) + 1
                self._jobs.put(line.popleft())
            if line is not None and not line:
                del self._ready[dest]

    def _release(self, job: Job, kept: FrozenSet[int] = frozenset()) -> None:
        """A job ended or was dropped: its recipients (but ``kept``) are free to plan (``_lock`` held)."""
        qid = job.queue_id
        self._busy.difference_update((qid, i) for i in job.indexes if i not in kept)
        left = self._jobs_of.get(qid, 1) - 1
        if left:
            self._jobs_of[qid] = left
        else:
            self._jobs_of.pop(qid, None)

    def _next_waiting(self, limit: int) -> Optional[str]:
        with self._lock:
            for dest, waiters in self._waiting.items():
                if not self._has_room(dest, limit):
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
        with self._lock:
            for kept in self._unsaved.values():
                wait = min(wait, kept.due - now)
        return max(0.05, wait)

    def _all_full(self, qid: str, destinations: FrozenSet[str], limit: int) -> bool:
        """True (and ``qid`` registered as waiting) when every destination it needs is at its limit."""
        with self._lock:
            if any(self._has_room(d, limit) for d in destinations):
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
        with self._lock:
            # Every destination with a recipient to try now at its limit (the busiest case, e.g. a slow
            # smart host): the message waits there as its jobs would, without them being built and dropped.
            ready = set() if env.held else _ready_destinations(env, now, self._busy)
            waits = bool(ready) and not any(self._has_room(d, limit) for d in ready)
            if waits:
                for dest in ready:
                    self._waiting.setdefault(dest, {})[qid] = None
            else:
                for job in plan_jobs(env, config, now, self._busy, stamp):
                    if not self._place(job, limit):
                        self._waiting.setdefault(job.destination, {})[qid] = None
                        waits = True
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
        job: Optional[Job] = None
        while True:
            if job is None:
                job = self._jobs.get()
                if job is None:
                    return
            outcome = _RELEASED
            try:
                outcome = self._run(job)
            except Exception:
                log.exception("%s: delivery job failed", job.queue_id)
            except BaseException:
                self._job_done(job, outcome, go_on=False)  # the thread ends: start nothing in it
                raise
            job = self._job_done(job, outcome)

    def _job_done(self, job: Job, outcome: Outcome, go_on: bool = True) -> Optional[Job]:
        """Account for a finished job; returns the next job of its destination's ready line, started.

        That job is this worker's only while no other job waits for a worker: else it queues behind them,
        so a busy destination never keeps workers from the jobs of others (first come, first served).
        """
        qid = job.queue_id
        dest = job.destination
        with self._lock:
            line = self._ready.get(dest)
            # The limit as planning last read it: a reload that lowered it shortens the line's run.
            room = self._active.get(dest, 0) <= self._limit
            following = line.popleft() if line and room and go_on and not self._stopping else None
            if line is not None and not line:
                del self._ready[dest]
            if following is None:
                self._active[dest] -= 1
                if not self._active[dest]:
                    del self._active[dest]
            elif not self._jobs.empty():
                self._jobs.put(following)  # it takes over this job's place in ``_active``
                following = None
            # Recipients whose results are kept in memory stay busy until they are saved (``_unkeep``).
            what, kept = outcome
            self._release(job, kept)
            # Planning looks at the message again, and at the messages waiting for this destination.
            if what == GONE:
                self._gone.add(qid)
            else:
                self._dirty.add(qid)
            # A message gone only needs forgetting, which the next round does anyway: wake planning for it
            # only when others wait for the room this job leaves.
            wake = what != GONE or dest in self._waiting
        if wake:
            self._wake.set()
        return following

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

    def _run(self, job: Job) -> Outcome:
        """Deliver one job and record the results (see ``Outcome``)."""
        config = self.config_source()
        env = self._job_envelope(job)
        if env is None:
            return _RELEASED if self.spool.exists(job.queue_id) else _GONE
        recipients = [env.recipients[i] for i in job.indexes]
        if any(r.state != PENDING for r in recipients) or env.held:
            return _RELEASED
        with self._lock:
            if self._stopping:
                return _RELEASED  # SPEC 7: only deliveries in progress finish; this one stays due for the next start
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
        return self._record(job, env, results, config, time.monotonic() - started)

    def _record(self, job: Job, delivered: Envelope, results: List[Result], config: Config,
                elapsed: float) -> Outcome:
        """Apply a job's results to a fresh copy of the envelope and save it before anything else happens.

        Returns GONE when the message is gone from the spool, KEPT (with the indexes) when the results could
        not be saved and are kept in memory (those recipients stay busy), else RELEASED.
        """
        now = self.now()
        qid = job.queue_id
        try:
            lock = self.spool.lock(qid, timeout=RECORD_LOCK_WAIT)
        except SpoolError as exc:
            if not self.spool.exists(qid):
                return _GONE
            # Another process keeps the lock (a suspended ``pmaster queue``?): never wait for it forever,
            # never forget what was delivered. Apply the results to the copy we delivered from and keep them.
            env = copy.deepcopy(delivered)
            return self._keep(env, self._apply_results(env, job, results, config, now, elapsed), config, now, exc)
        with lock:
            try:
                env, env_saved = self._locked_envelope(job, lock)
            except SpoolError:
                log.info("%s: removed during delivery", qid)
                return _RELEASED if self.spool.exists(qid) else _GONE
            changed = self._apply_results(env, job, results, config, now, elapsed)
            newly_bounced = any(env.recipients[i].state == BOUNCED for i in changed)
            if env.done() and not newly_bounced and self._remove(qid, env_saved):
                return _GONE  # nothing left to record: no save first (durable removal is enough)
            try:
                self.spool.save(env)
            except SpoolError as exc:
                return self._keep(env, changed, config, now, exc)
            if env.done():
                return _GONE if self._remove(qid) else _RELEASED
            self._hand_back(env)
        return _RELEASED

    def _locked_envelope(self, job: Job, lock: SpoolLock) -> Tuple[Envelope, bool]:
        """A fresh copy of the record (``lock`` held): a copy of the one planned when the file is unchanged.

        Also says whether an ``ID.env`` may exist (False only when the stamp just proved it does not).
        """
        planned = job.envelope
        if planned is not None and job.stamp is not None:
            try:
                unchanged = lock.stamp() == job.stamp
            except OSError:
                unchanged = False
            if unchanged:
                # One stat instead of reading and parsing the record; other jobs share ``planned``: copy
                # what results change (the recipients), never modify it.
                env = copy.copy(planned)
                env.recipients = [copy.copy(r) for r in planned.recipients]
                return env, bool(job.stamp[0])
        return self.spool.load(job.queue_id), True

    def _apply_results(self, env: Envelope, job: Job, results: List[Result], config: Config, now: float,
                       elapsed: float) -> List[int]:
        """Apply results to the pending recipients of ``env``, queue the report for new failures, log each one.

        Returns the indexes changed. The report is queued before the failure is recorded: a crash in between
        can only repeat the report, never lose it; a report that cannot be stored leaves the failures deferred.
        """
        changed: List[int] = []
        bounced: List[Recipient] = []
        for i, result in zip(job.indexes, results):
            r = env.recipients[i]
            if r.state != PENDING:
                continue  # decided meanwhile (``pmaster queue bounce``): keep that
            self._apply(env, r, result, config, now)
            changed.append(i)
            if r.state == BOUNCED:
                bounced.append(r)
        if bounced:
            self._bounce(env, bounced, config, now)
        for i in changed:
            r = env.recipients[i]
            self._log_result(env, r, now)
            if self.metrics is not None:
                self.metrics.delivery(job.mailer, STATUS_WORDS[r.state], elapsed)
        return changed

    def _keep(self, env: Envelope, changed: List[int], config: Config, now: float, exc: Exception) -> Outcome:
        """Keep results that could not be saved; planning saves them later (``_save_unsaved``).

        ``env`` is this job's own copy, so its recipients can be kept without copying them.
        """
        qid = env.queue_id
        with self._lock:
            kept = self._unsaved.get(qid)
            if kept is None:
                delay = _save_delay(1, config)
                kept = self._unsaved[qid] = _Unsaved({}, 1, now + delay)
            for i in changed:
                kept.recipients[i] = env.recipients[i]
            delay = max(0, int(kept.due - now))
        log.error("%s: cannot record delivery results: %s (kept in memory, next try in %ds)", qid, exc, delay)
        return KEPT, frozenset(changed)

    def _save_unsaved(self, config: Config, now: float, final: bool = False) -> bool:
        """Try again to save kept results that are due (all of them when ``final``); True when any was saved."""
        with self._lock:
            due = [(qid, dict(kept.recipients)) for qid, kept in self._unsaved.items() if final or kept.due <= now]
        saved = False
        for qid, recipients in due:
            try:
                outcome = self._save_kept(qid, recipients)
            except SpoolError as exc:
                self._save_failed(qid, config, now, exc, final)
                continue
            self._unkeep(qid, recipients, outcome)
            saved = True
        if saved:
            self._wake.set()
        return saved

    def _save_kept(self, qid: str, recipients: Dict[int, Recipient]) -> str:
        """Put kept results into a fresh copy of the record; GONE or RELEASED, ``SpoolError`` to try later."""
        lock = self.spool.try_lock(qid)
        if lock is None:
            raise SpoolError("%s: message is locked" % qid)
        with lock:
            try:
                env = self.spool.load(qid)
            except SpoolError:
                if self.spool.exists(qid):
                    raise
                log.info("%s: removed before its delivery results could be recorded", qid)
                return GONE
            for i, r in recipients.items():
                if i < len(env.recipients) and env.recipients[i].state == PENDING:
                    env.recipients[i] = r
            if env.done():
                self.spool.remove(qid)
                log.info("%s: removed", qid)
                return GONE
            self.spool.save(env)
            log.info("%s: delivery results recorded", qid)
            self._hand_back(env)
        return RELEASED

    def _unkeep(self, qid: str, recipients: Dict[int, Recipient], outcome: str) -> None:
        """Forget kept results just saved (a job may have added others meanwhile) and free their recipients."""
        with self._lock:
            freed = set(recipients)
            kept = self._unsaved.get(qid)
            if kept is not None and outcome == GONE:
                freed.update(kept.recipients)  # nothing left to record them in
                del self._unsaved[qid]
            elif kept is not None:
                for i in recipients:
                    kept.recipients.pop(i, None)  # busy until now: no job can have replaced it
                if not kept.recipients:
                    del self._unsaved[qid]
            self._busy.difference_update((qid, i) for i in freed)
            if outcome == GONE:
                self._gone.add(qid)
            else:
                self._dirty.add(qid)

    def _save_failed(self, qid: str, config: Config, now: float, exc: SpoolError, final: bool) -> None:
        with self._lock:
            kept = self._unsaved.get(qid)
            if kept is None:
                return
            kept.failures += 1
            delay = _save_delay(kept.failures, config)
            kept.due = now + delay
            count = len(kept.recipients)
        if final:
            log.error("%s: cannot record delivery results: %s; lost at exit: %d recipient(s) will be tried again",
                      qid, exc, count)
            return
        log.error("%s: cannot record delivery results: %s (kept in memory, next try in %ds)", qid, exc, delay)

    def _remove(self, qid: str, env_saved: bool = True) -> bool:
        try:
            self.spool.remove(qid, env_saved)
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
        if result.status == TEMPFAIL and not result.tried and now < env.arrival + config.core.queue_lifetime:
            # Skipped without an attempt (a host that refused moments ago): no attempt counted, no doubling.
            r.last_reply = result.reply
            r.dsn_status = result.enhanced
            r.next_attempt = min(now + config.core.retry_min, env.arrival + config.core.queue_lifetime)
            return
        r.attempts += 1
        r.last_attempt = now
        if r.first_attempt is None:
            r.first_attempt = now
        reply = sanitize.remote_text(result.reply)  # a peer's text: no controls into the log or DSN (issue 17)
        r.last_reply = reply
        r.dsn_status = sanitize.remote_text(result.enhanced)
        expires = env.arrival + config.core.queue_lifetime
        if result.status == OK:
            r.state = SENT
        elif result.status == PERMFAIL:
            r.state = BOUNCED
        elif now >= expires:
            r.state = BOUNCED
            r.last_reply = "%s (gave up: in queue longer than %ds)" % (reply, config.core.queue_lifetime)
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
        try:
            qid = send_bounce(self.spool, env, failed, config, self.route_bounce, now)
        except SpoolError as exc:
            # The report is due and cannot be stored (disk full): recording the failure now would lose it.
            # The recipients stay pending and are tried again later, as after a temporary failure.
            log.error("%s: cannot queue the non-delivery report: %s (%d recipient(s) stay deferred)",
                      env.queue_id, exc, len(failed))
            for r in failed:
                r.state = PENDING
                r.next_attempt = now + backoff(r.attempts, config.core.retry_min, config.core.retry_max)
                r.last_reply = "%s; non-delivery report not queued (%s), will try again" % (r.last_reply, exc)
            return
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
    """Write the report for ``failed`` into the spool; returns its queue id (None when none is due or routable).

    Never to the null sender; a failed report goes once to the local postmaster, never further (SPEC 5).
    Raises ``SpoolError`` when a report is due and cannot be stored: the caller must not record the
    failures as bounced then, or the report is lost.
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
    """Store a report; its ``SpoolError`` reaches the caller, which says what it keeps instead."""
    if not recipients:
        log.error("no route for a non-delivery notification; dropped")
        return None
    with spool.writer() as w:
        w.write(body)
        env = Envelope(queue_id=w.queue_id, sender="", recipients=recipients, arrival=now, size=len(body),
                       listener="bounce", is_bounce=True, to_postmaster=to_postmaster)
        w.commit(env)
    return env.queue_id
