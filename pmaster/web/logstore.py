"""A bounded in-memory record of recent log lines per queue id, for the web admin's message detail.

API: ``LogStore(max_ids=10000, per_id=100)``; ``tap(created, level, message)`` is ``logsetup.set_tap``'s
  callback; ``lines(qid) -> [(created, level, message)]``.
Invariants: a line belongs to a message when it starts with ``QUEUEID:`` (SPEC 7: every line about a message
  does); at most ``max_ids`` messages (the oldest forgotten first) and ``per_id`` lines each are kept, so memory
  stays bounded whatever the traffic. Lines are kept as logged; escaping is the views' job.
Threading: ``tap`` runs in the log writer thread, ``lines`` in the web admin's; one lock.
"""

import collections
import re
import threading
from typing import Deque, List, Tuple

_QID = re.compile(r"([0-9A-Z]{13,64}): ")

Line = Tuple[float, str, str]


class LogStore:
    def __init__(self, max_ids: int = 10000, per_id: int = 100):
        self.max_ids = max_ids
        self.per_id = per_id
        self._lock = threading.Lock()
        self._by_id: "collections.OrderedDict[str, Deque[Line]]" = collections.OrderedDict()

    def tap(self, created: float, level: str, message: str) -> None:
        m = _QID.match(message)
        if m is None:
            return
        qid = m.group(1)
        with self._lock:
            lines = self._by_id.get(qid)
            if lines is None:
                lines = self._by_id[qid] = collections.deque(maxlen=self.per_id)
                while len(self._by_id) > self.max_ids:
                    self._by_id.popitem(last=False)
            lines.append((created, level, message))

    def lines(self, qid: str) -> List[Line]:
        with self._lock:
            return list(self._by_id.get(qid, ()))
