"""Postmaster policy callable: at most LIMIT recipients per sender address per WINDOW seconds.

    [smtpd mx]
      policy = rcptcap:check

Put this file next to the configuration file. Counts live in memory: they start over when pmaster restarts
or reloads (SIGHUP imports the module again). The null sender (bounces) is not capped. Over the cap, RCPT
answers ``452 4.5.3`` (RFC 5321 4.5.3.1.10: a well-behaved client sends the rest in a later transaction).
Set ``PMASTER_RCPTCAP_LIMIT`` / ``PMASTER_RCPTCAP_WINDOW`` in pmaster's environment to change the figures.
"""

import collections
import os
import threading
import time

LIMIT = int(os.environ.get("PMASTER_RCPTCAP_LIMIT", "100"))
WINDOW = float(os.environ.get("PMASTER_RCPTCAP_WINDOW", "3600"))
MAX_SENDERS = 100000  # bounded memory: the oldest senders are forgotten first

_lock = threading.Lock()  # sessions call us from many threads at once
_seen = collections.OrderedDict()  # sender -> deque of accept times


def check(stage, session):
    if stage != "rcpt" or not session.mail_from:
        return None
    sender = session.mail_from.lower()
    now = time.monotonic()
    with _lock:
        times = _seen.pop(sender, None) or collections.deque()
        while times and now - times[0] >= WINDOW:
            times.popleft()
        _seen[sender] = times
        while len(_seen) > MAX_SENDERS:
            _seen.popitem(last=False)
        if len(times) >= LIMIT:
            return (452, "4.5.3", "Too many recipients for <%s>; try the rest later" % session.mail_from)
        # Counted when asked: a later check may still refuse the recipient, and then it counts anyway
        # (a sender probing many addresses is capped all the same).
        times.append(now)
    return None
