"""An in-memory index of the queue for the web admin: paging and filters without reading every envelope.

API:
  ``QueueIndex(spool)``: ``refresh()`` brings it up to date (at most every ``MIN_REFRESH`` seconds unless
    ``force``); ``feed(qid, fresh)`` takes an envelope the SMTP side just wrote (``Runtime.notify``), so a
    new message costs no read; ``query(Filter, offset, limit) -> (total, [Entry])``; ``counts() -> (by state,
    oldest age)``; ``unindexed_page(offset, limit)`` serves an unfiltered page before the first refresh is
    done; ``subject(entry)`` reads the Subject on demand (cached).
  ``Filter.parse(mapping)``: sender, recipient, domain, state, age (a duration: older than), text.
Invariants: a refresh is one listing of ``queue/`` (``Spool.listing``): ids that appeared are loaded (or taken
  from what was fed), ids that went are dropped, and only messages with a saved envelope (``ID.env``: the
  only ones that can change) are stat'ed, and re-read when their stamp changed. So a page over 100,000
  queued messages costs a listing and a filter in memory, not 100,000 reads. Entries are small summaries,
  never whole envelopes.
Threading: every method may be called from any thread; one lock guards the maps; loads happen outside it.
Errors: an unreadable record is skipped (the spool moves it to ``corrupt/``); a vanished one is dropped.
"""

import re
import threading
import time
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from pmaster.envelope import PENDING, Envelope
from pmaster.errors import SpoolError
from pmaster.spool import Spool

MIN_REFRESH = 1.0
STATES = ("active", "deferred", "hold")
SUBJECT_SNIFF = 16 * 1024


class Entry:
    """The summary of one queued message that paging and filters need."""

    __slots__ = ("qid", "sender", "recipients", "replies", "held", "due", "arrival", "size", "stamp", "subject")

    def __init__(self, env: Envelope, stamp: tuple):
        self.qid = env.queue_id
        self.sender = env.sender
        self.recipients = tuple(r.address for r in env.recipients)
        self.replies = " ".join(r.last_reply for r in env.recipients if r.last_reply)
        self.held = env.held
        due = [r.next_attempt for r in env.recipients if r.state == PENDING]
        self.due: Optional[float] = min(due) if due else None
        self.arrival = env.arrival
        self.size = env.size
        self.stamp = stamp
        self.subject: Optional[str] = None

    def state(self, now: float) -> str:
        """As ``pmaster queue list`` says it (``queuecmd.message_state``)."""
        if self.held:
            return "hold"
        return "active" if self.due is not None and self.due <= now else "deferred"


_AGE = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class Filter:
    FIELDS = ("sender", "recipient", "domain", "state", "age", "text")

    def __init__(self, sender: str = "", recipient: str = "", domain: str = "", state: str = "", age: str = "",
                 text: str = ""):
        self.sender = sender.strip().lower()
        self.recipient = recipient.strip().lower()
        self.domain = domain.strip().lower().lstrip("@").rstrip(".")
        self.state = state.strip().lower()
        self.age_text = age.strip()
        self.text = text.strip().lower()
        self.min_age = 0
        self.problems: List[str] = []
        if self.state and self.state not in STATES:
            self.problems.append("state must be one of %s" % ", ".join(STATES))
            self.state = ""
        if self.age_text:
            m = _AGE.match(self.age_text)
            if m is None:
                self.problems.append("age must be a duration such as 30m, 2h or 5d")
            else:
                self.min_age = int(m.group(1)) * _AGE_UNITS[m.group(2)]

    @classmethod
    def parse(cls, values: Mapping[str, str]) -> "Filter":
        return cls(**{k: str(values.get(k, "") or "") for k in cls.FIELDS})

    def empty(self) -> bool:
        return not (self.sender or self.recipient or self.domain or self.state or self.min_age or self.text)

    def as_dict(self) -> Dict[str, str]:
        return {"sender": self.sender, "recipient": self.recipient, "domain": self.domain, "state": self.state,
                "age": self.age_text, "text": self.text}


class QueueIndex:
    def __init__(self, spool: Spool):
        self.spool = spool
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._entries: Dict[str, Entry] = {}
        self._order: List[str] = []
        self._fed: Dict[str, Tuple[tuple, Envelope]] = {}
        self._last = 0.0
        self.loaded = 0  # envelopes read from disk, for the figures
        self.ready = False  # the first refresh is done (at start it reads every envelope once)

    def feed(self, qid: Optional[str], fresh: Optional[tuple] = None) -> None:
        """``Runtime.notify``'s tap: remember the envelope just written, so the next refresh need not read it."""
        if qid is not None and fresh is not None:
            self._fed[qid] = fresh

    def forget(self, qid: str) -> None:
        """After an action of ours: look at the message again at the next refresh."""
        with self._lock:
            entry = self._entries.get(qid)
            if entry is not None:
                entry.stamp = ()
        self._last = 0.0

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < MIN_REFRESH:
            return
        with self._refresh_lock:
            if not force and time.monotonic() - self._last < MIN_REFRESH:
                return
            self._refresh()
            self._last = time.monotonic()
            self.ready = True

    def _refresh(self) -> None:
        try:
            ids, saved = self.spool.listing()
        except SpoolError:
            return
        with self._lock:
            known = dict(self._entries)
        fresh: Dict[str, Entry] = {}
        for qid in ids:
            entry = known.get(qid)
            fed = self._fed.pop(qid, None)
            if entry is not None and (qid not in saved and entry.stamp and entry.stamp[0] == 0):
                fresh[qid] = entry  # no ID.env, and the record is written once: unchanged
                continue
            if entry is None and fed is not None and qid not in saved:
                fresh[qid] = Entry(fed[1], fed[0])
                continue
            entry = self._reload(qid, entry)
            if entry is not None:
                fresh[qid] = entry
        for qid in list(self._fed):
            if qid not in fresh:
                self._fed.pop(qid, None)  # delivered before we looked
        with self._lock:
            self._entries = fresh
            self._order = [q for q in ids if q in fresh]

    def _reload(self, qid: str, entry: Optional[Entry]) -> Optional[Entry]:
        try:
            stamp = self.spool.stamp(qid)
        except OSError:
            return None
        if entry is not None and entry.stamp == stamp:
            return entry
        try:
            env = self.spool.load(qid)
        except SpoolError:
            return None
        self.loaded += 1
        new = Entry(env, stamp)
        if entry is not None:
            new.subject = entry.subject
        return new

    def unindexed_page(self, offset: int, limit: int) -> Tuple[int, List[Entry]]:
        """While the first refresh still reads the queue: an unfiltered page from one listing and the few
        envelopes it shows, so the first page is quick even just after a start with a full queue."""
        try:
            ids = self.spool.ids()
        except SpoolError:
            return 0, []
        out = []
        for qid in ids[max(0, offset):max(0, offset) + max(0, limit)]:
            entry = self.get(qid) or self._reload(qid, None)
            if entry is not None:
                out.append(entry)
        return len(ids), out

    def get(self, qid: str) -> Optional[Entry]:
        with self._lock:
            return self._entries.get(qid)

    def query(self, flt: Filter, offset: int = 0, limit: int = 50, now: Optional[float] = None
              ) -> Tuple[int, List[Entry]]:
        now = time.time() if now is None else now
        with self._lock:
            entries = [self._entries[q] for q in self._order]
        if not flt.empty():
            entries = [e for e in entries if self._matches(e, flt, now)]
        return len(entries), entries[max(0, offset):max(0, offset) + max(0, limit)]

    def select(self, flt: Filter, now: Optional[float] = None) -> List[str]:
        """Every queue id the filter matches (for an action on a whole filter)."""
        return [e.qid for e in self.query(flt, 0, 10 ** 9, now)[1]]

    def _matches(self, e: Entry, f: Filter, now: float) -> bool:
        if f.state and e.state(now) != f.state:
            return False
        if f.min_age and now - e.arrival < f.min_age:
            return False
        if f.sender and f.sender not in e.sender.lower():
            return False
        if f.recipient and not any(f.recipient in r.lower() for r in e.recipients):
            return False
        if f.domain and not _has_domain(e, f.domain):
            return False
        if f.text:
            hay = " ".join((e.sender, " ".join(e.recipients), e.replies, self.subject(e))).lower()
            if f.text not in hay:
                return False
        return True

    def counts(self, now: Optional[float] = None) -> Tuple[Dict[str, int], float]:
        now = time.time() if now is None else now
        with self._lock:
            entries = list(self._entries.values())
        out = {s: 0 for s in STATES}
        oldest = 0.0
        for e in entries:
            out[e.state(now)] += 1
            oldest = max(oldest, now - e.arrival)
        return out, oldest

    def subject(self, entry: Entry) -> str:
        if entry.subject is None:
            entry.subject = read_subject(self.spool, entry.qid)
        return entry.subject


def _has_domain(e: Entry, domain: str) -> bool:
    addresses: Iterable[str] = (e.sender,) + e.recipients
    return any(a.rpartition("@")[2].lower() == domain for a in addresses)


def read_headers(spool: Spool, qid: str, limit: int = SUBJECT_SNIFF) -> List[Tuple[str, str]]:
    """The message's header fields (unfolded), read from at most ``limit`` octets of its body."""
    try:
        with spool.open_body(qid) as f:
            raw = f.read(limit)
    except (OSError, SpoolError):
        return []
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n")
    block = text.split("\n\n", 1)[0]
    fields: List[Tuple[str, str]] = []
    for line in block.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    return fields


def read_subject(spool: Spool, qid: str) -> str:
    for name, value in read_headers(spool, qid):
        if name.lower() == "subject":
            return value
    return ""
