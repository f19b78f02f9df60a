"""Keep the daemon's threads on one CPU; give the programs it runs all of them back.

API: ``pin_daemon() -> Optional[int]`` (the CPU chosen, None when nothing was done) and ``widened()``, a
  context manager the pipe mailer spawns its children in.
Why: the interpreter runs one thread at a time (the GIL), and every system call a session or delivery
  makes passes the lock to another thread. Between threads on different CPUs each hand-off is a
  cross-CPU wake-up (an inter-processor interrupt, dear on virtual machines); on one CPU it is a plain
  context switch. Measured with 20 sessions on 2 CPUs: about half the CPU time per message, and +25-45%
  messages per second accepted and relayed (scripts/bench-smtp). Postfix has no such thing because it has
  no GIL: its processes run in parallel.
Which CPU: the one the daemon runs on at start, within the CPUs it is allowed (taskset, cgroup cpusets), so
  two daemons on one host usually land on different CPUs. ``PMASTER_PIN_CPU=no`` in the environment leaves
  the affinity alone. Linux only (elsewhere: nothing happens).
Children: a pipe mailer's program inherits the affinity of the thread that forks it, so that thread widens
  its own mask (Linux affinity is per thread) for the fork and narrows it again: procmail and friends run
  on any CPU the daemon was allowed.
"""

import contextlib
import logging
import os
from typing import Iterator, Optional, Set

log = logging.getLogger("pmaster.daemon")

_allowed: Optional[Set[int]] = None  # the daemon's CPUs before pinning; None while not pinned
_pinned: Optional[Set[int]] = None


def _current_cpu() -> Optional[int]:
    """The CPU this thread last ran on (field 39 of /proc/self/stat), None when unreadable."""
    try:
        with open("/proc/thread-self/stat", "rb") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
        return int(stat[stat.rindex(b")") + 2:].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def _tasks() -> Iterator[int]:
    try:
        names = os.listdir("/proc/self/task")
    except OSError:
        names = []
    for name in names:
        if name.isdigit():
            yield int(name)


def pin_daemon() -> Optional[int]:
    """Put every thread of this process on one CPU (threads started later inherit it); see the module doc."""
    global _allowed, _pinned
    if not hasattr(os, "sched_setaffinity") or os.environ.get("PMASTER_PIN_CPU", "").lower() in ("no", "0", "off"):
        return None
    try:
        allowed = os.sched_getaffinity(0)
    except OSError:
        return None
    if len(allowed) < 2:
        return None
    cpu = _current_cpu()
    if cpu not in allowed:
        cpu = min(allowed)
    try:
        for tid in _tasks():
            try:
                os.sched_setaffinity(tid, {cpu})
            except ProcessLookupError:
                pass  # a thread that just ended
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        log.warning("cannot keep the daemon on CPU %d: %s (running unpinned)", cpu, exc)
        return None
    _allowed, _pinned = set(allowed), {cpu}
    log.info("threads kept on CPU %d (of %s); programs run on all of them", cpu,
             ",".join(str(c) for c in sorted(allowed)))
    return cpu


@contextlib.contextmanager
def widened() -> Iterator[None]:
    """Run the block with the calling thread allowed on all the daemon's CPUs (fork children inside it)."""
    if _allowed is None or _pinned is None:
        yield
        return
    try:
        os.sched_setaffinity(0, _allowed)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        try:
            os.sched_setaffinity(0, _pinned)
        except OSError:
            pass
