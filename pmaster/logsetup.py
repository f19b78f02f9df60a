"""Logging back-ends: stderr, syslog and ``[logfile]`` files named by a strftime pattern.

API: ``configure(config, foreground) -> None`` installs handlers on the ``pmaster`` logger tree:
  ``[core] logger`` for everything, and a listener's own ``logger`` for ``pmaster.smtpd.<ident>``.
  ``StrftimeFileHandler(pattern)``: expands the pattern at each write, so a new day opens a new file.
  ``hand_over(uid, gid)``: before the daemon drops privileges, opens the current log files and gives them
  (and the directories this module created for them) to the new owner.
  ``EventLog(name)``: a logger's ``info`` for lines logged per message (the sessions' connect, queued and
  disconnect lines), which skips the ``LogRecord`` when only our handlers listen; the lines are the same.
  ``flush()``: waits (bounded) until every queued line is written.
Invariants: one line per event; no tracebacks in syslog lines (they are folded onto one line); the line of
  an event about a message starts with its queue id (the callers' duty; the formats put nothing between the
  level and the message). When syslog cannot be reached, stderr is used with one warning (SPEC 2).
Errors: a log file that cannot be written is reported once on stderr per file and never raises into the
  caller (logging must not stop mail).
Threading: ``configure`` runs in the main thread (start and SIGHUP); handlers lock around their writes;
  one writer thread per process writes every line (``_Async``, ``EventLog``).
"""

import atexit
import collections
import logging
import logging.handlers
import os
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from pmaster.config import Config

_FORMAT_FILE = "%(asctime)s %(name)s[%(process)d]: %(levelname)s: %(message)s"
_FORMAT_STDERR = "%(asctime)s %(name)s: %(levelname)s: %(message)s"
_installed: Dict[str, logging.Handler] = {}
_configured: Set[str] = set()  # logger names given handlers by configure(), to undo what a reload drops
_pending_warnings: List[str] = []  # said once the handlers are in place, so they reach the right place


class _Formatter(logging.Formatter):
    """``logging.Formatter`` that renders the time stamp once per second, not once per line."""

    _cached: Tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (second, time.strftime(self.default_time_format, self.converter(second)))
        return self.default_msec_format % (cached[1], record.msecs)

    def stamp(self, created: float) -> str:
        """``asctime`` of a record created at ``created``, as ``formatTime`` renders it."""
        second = int(created)
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (second, time.strftime(self.default_time_format, self.converter(second)))
        return self.default_msec_format % (cached[1], (created - second) * 1000)


class StrftimeFileHandler(logging.Handler):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = pattern
        self._path: Optional[str] = None
        self._stream = None
        self._io = threading.Lock()
        self._failed: Optional[str] = None  # the path whose failure was reported, to report it once
        self.created_dirs: List[str] = []
        self.batched = False  # the writer thread flushes once per batch of lines
        self._expanded: Tuple[int, str] = (-1, "")  # the pattern expanded for one second

    def flush(self) -> None:
        with self._io:
            if self._stream is not None:
                try:
                    self._stream.flush()
                except OSError:
                    pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.format(record).replace("\n", " | ") + "\n", record.created)
        except Exception:
            self.handleError(record)

    def write_event(self, name: str, created: float, message: str) -> None:
        """Write an ``EventLog`` line: the line ``emit`` would write for an INFO record of ``name``."""
        formatter = self.formatter
        if not isinstance(formatter, _Formatter) or formatter._fmt != _FORMAT_FILE:
            self.handle(_event_record(name, created, message))
            return
        try:
            self._write("%s %s[%d]: INFO: %s\n" % (formatter.stamp(created), name, _pid[0],
                                                     message.replace("\n", " | ")), created)
        except Exception:
            self.handleError(_event_record(name, created, message))

    def _write(self, line: str, created: float) -> None:
        path = self._expand(created)
        with self._io:
            if path != self._path:
                self._open(path)
            self._stream.write(line)
            if not self.batched:
                self._stream.flush()

    def _expand(self, when: float) -> str:
        second = int(when)
        expanded = self._expanded
        if expanded[0] != second:
            expanded = self._expanded = (second, time.strftime(self.pattern, time.localtime(second)))
        return expanded[1]

    def _open(self, path: str) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
            self._path = None
        self._make_dirs(os.path.dirname(path))
        self._stream = open(path, "a", encoding="utf-8")
        self._path = path

    def _make_dirs(self, directory: str) -> None:
        missing = []
        while directory and not os.path.isdir(directory):
            missing.append(directory)
            parent = os.path.dirname(directory)
            if parent == directory:
                break
            directory = parent
        for d in reversed(missing):
            os.makedirs(d, exist_ok=True)
            self.created_dirs.append(d)

    def hand_over(self, uid: int, gid: int) -> None:
        """Open today's file now and give it, and the directories made for it, to ``uid``/``gid``."""
        with self._io:
            path = time.strftime(self.pattern)
            if path != self._path:
                self._open(path)
            for name in self.created_dirs + [path]:
                os.chown(name, uid, gid)

    def handleError(self, record: logging.LogRecord) -> None:
        # One line on stderr per failing file, never a traceback per message (stderr may be a terminal).
        exc = sys.exc_info()[1]
        path = self._path or time.strftime(self.pattern)
        if self._failed == path:
            return
        self._failed = path
        try:
            sys.stderr.write("pmaster: cannot write log file %s: %s\n" % (path, getattr(exc, "strerror", None) or exc))
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        with self._io:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
                self._path = None
        super().close()


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


def _syslog_handler(config: Config) -> logging.Handler:
    facility = logging.handlers.SysLogHandler.facility_names.get(config.syslog.facility,
                                                                 logging.handlers.SysLogHandler.LOG_MAIL)
    for address in ("/dev/log", "/var/run/syslog"):
        if os.path.exists(address):
            try:
                handler = logging.handlers.SysLogHandler(address=address, facility=facility)
            except OSError:
                continue
            handler.setFormatter(_OneLine("%s[%%(process)d]: %%(message)s" % config.syslog.ident))
            return handler
    _pending_warnings.append("syslog is not reachable (no /dev/log): logging to stderr")
    return _stderr_handler()


class _Async(logging.Handler):
    """Hands records to one writer thread, so a session never waits on log I/O.

    Why: while other threads fsync the spool, a write to a log file on the same file system can stall for
    milliseconds; with the handler's lock held, every session thread would queue up behind it.
    The message is rendered in the calling thread (its arguments may change later); the writer thread is
    started on first use in each process, so it exists again after ``--daemon`` forks.
    """

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.process = _pid[0]
            record.msg = record.getMessage()
            record.args = None
            if record.exc_info:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            _post((self.target, record))
        except Exception:
            self.handleError(record)


class EventLog:
    """``info`` for the lines a busy daemon writes per message (connect, queued, disconnect), cheaply.

    Why: through ``logging.Logger`` each line builds a ``LogRecord`` and passes filters and handler locks;
    the three lines of a message came to a tenth of the daemon's CPU at 20 sessions (scripts/bench-smtp).
    When every handler on the logger's way up is one ``configure`` installed (``_Async``, no filters),
    ``info`` queues (handler, (name, time, message)) for the writer thread, which writes the very line the
    record would have given. Anything else on the way (a test's capturing handler, a filter) gets a real
    record through the logger. ``warning``, ``error`` and ``exception`` always go through the logger.
    """

    __slots__ = ("logger",)

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def info(self, msg: str, *args: object) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        targets = _plain_targets(logger)
        if targets is None or (len(args) == 1 and isinstance(args[0], dict)):  # a dict: logging's own rules
            logger.info(msg, *args)
            return
        try:
            text = msg % args if args else msg
        except Exception:  # logging reports a bad format on stderr; it never raises into the caller
            logger.info(msg, *args)
            return
        event = (logger.name, time.time(), text)
        for target in targets:
            _post((target, event))

    def warning(self, msg: str, *args: object) -> None:
        self.logger.warning(msg, *args)

    def error(self, msg: str, *args: object) -> None:
        self.logger.error(msg, *args)

    def exception(self, msg: str, *args: object) -> None:
        self.logger.exception(msg, *args)


def _plain_targets(logger: logging.Logger) -> Optional[List[logging.Handler]]:
    """The handlers an INFO record of ``logger`` would reach, when all are ``_Async`` without filters."""
    if logger.disabled:
        return None
    targets = []
    current: Optional[logging.Logger] = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if type(handler) is not _Async or handler.filters or handler.level > logging.INFO:
                return None
            if handler.target.filters or handler.target.level > logging.INFO:
                return None
            targets.append(handler.target)
        if not current.propagate:
            break
        current = current.parent
    return targets


def _event_record(name: str, created: float, message: str) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, "", 0, message, None, None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    record.process = _pid[0]
    return record


def _write_event(target: logging.Handler, event: Tuple[str, float, str]) -> None:
    if isinstance(target, StrftimeFileHandler):
        target.write_event(*event)
    else:
        target.handle(_event_record(*event))


_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def _cheap_records() -> None:
    """Per record, logging asks the OS for the pid and walks the stack for the caller; our lines use
    neither the caller nor a fresh pid, and under load those costs add up (one system call per line)."""
    logging.logProcesses = False
    logging.logThreads = False  # the formats name no thread
    logging.logMultiprocessing = False
    logging._srcfile = None  # documented switch: no caller look-up (we never print file or line)


_cheap_records()

# The writer's queue: a deque (append and popleft are atomic: no lock per line). The writer waits on
# _wake only after it found the queue empty and said so in _writer_idle; _writing is up while it holds
# lines taken from the queue but not yet written (``flush`` waits for both).
_lines: "collections.deque" = collections.deque()
_wake = threading.Event()
_writer_idle = [False]
_writing = [False]


def _post(item: tuple) -> None:
    _writer()
    _lines.append(item)
    if _writer_idle[0]:
        _wake.set()


def _after_fork_in_child() -> None:
    """The writer thread does not survive a fork: the child starts over with an empty queue (lines
    queued before the fork belong to the parent)."""
    global _lines, _wake
    _lines = collections.deque()
    _wake = threading.Event()
    _writer_idle[0] = False
    _writing[0] = False
    _writer_pid[0] = 0


os.register_at_fork(after_in_child=lambda: _after_fork_in_child())
_writer_pid = [0]
_writer_lock = threading.Lock()


def _writer() -> None:
    if _writer_pid[0] != _pid[0]:
        with _writer_lock:
            if _writer_pid[0] != _pid[0]:
                threading.Thread(target=_write_loop, name="log-writer", daemon=True).start()
                _writer_pid[0] = _pid[0]


_GATHER_SECONDS = 0.02
_BATCH = 512


_tap: List[Optional[Callable[[float, str, str], None]]] = [None]


def set_tap(tap: Optional[Callable[[float, str, str], None]]) -> None:
    """Give every line written through the writer thread to ``tap(created, level, message)`` as well (the web
    admin's record of recent log lines per queue id); None removes it. Runs in the writer thread, once per
    line even when the line goes to several handlers."""
    _tap[0] = tap


def _tap_item(tap: Callable[[float, str, str], None], item: object) -> None:
    try:
        if type(item) is tuple:
            tap(item[1], "INFO", item[2])  # type: ignore[index]
        else:
            tap(item.created, item.levelname, item.msg)  # type: ignore[attr-defined]
    except Exception:  # the tap must never stop logging
        pass


def _write_loop() -> None:
    """Write what is queued in batches: one wake-up and one flush per handler per batch, not per line."""
    while True:
        batch = _take_batch()
        targets = []
        tap = _tap[0]
        tapped = None
        for target, item in batch:
            if tap is not None and item is not tapped:
                _tap_item(tap, item)
                tapped = item
            try:
                if isinstance(target, StrftimeFileHandler):
                    target.batched = True
                if type(item) is tuple:
                    _write_event(target, item)
                else:
                    target.handle(item)
            except Exception:  # a broken log must not stop logging
                pass
            if target not in targets:
                targets.append(target)
        for target in targets:
            try:
                target.flush()
            except Exception:
                pass
        _writing[0] = False
        # Let lines gather: a busy daemon logs 3 lines per message, and waking this thread for each one
        # costs an interpreter-lock hand-off per line. A line waits at most this long.
        if len(batch) < _BATCH:
            time.sleep(_GATHER_SECONDS)


def _take_batch() -> list:
    """Up to _BATCH queued items, waiting for the first one."""
    lines = _lines
    while not lines:
        _writer_idle[0] = True
        if not lines:  # looked at again: a _post that saw the flag still down did not wake us
            _wake.wait(1.0)
        _wake.clear()
        _writer_idle[0] = False
    _writing[0] = True
    batch = []
    while lines and len(batch) < _BATCH:
        batch.append(lines.popleft())
    return batch


def flush(timeout: float = 5.0) -> None:
    """Wait (bounded) until every queued log line is written: at exit, so the last lines are not lost."""
    deadline = time.monotonic() + timeout
    while (_lines or _writing[0]) and time.monotonic() < deadline and _writer_pid[0] == os.getpid():
        time.sleep(0.01)


atexit.register(flush)

_async_for: Dict[int, _Async] = {}


def _async(handler: logging.Handler) -> _Async:
    wrapper = _async_for.get(id(handler))
    if wrapper is None or wrapper.target is not handler:
        wrapper = _async_for[id(handler)] = _Async(handler)
    return wrapper


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(_FORMAT_STDERR))
    return handler


def _handler_for(name: Optional[str], config: Config, foreground: bool) -> logging.Handler:
    if name is None:
        name = "stderr" if foreground else "syslog"
    key = "%s|%s" % (name, config.logfiles[name].file if name in config.logfiles else "")
    if key in _installed:
        return _installed[key]
    if name == "stderr":
        handler = _stderr_handler()
    elif name == "syslog":
        handler = _syslog_handler(config)
    else:
        handler = StrftimeFileHandler(config.logfiles[name].file)
        handler.setFormatter(_Formatter(_FORMAT_FILE))
    _installed[key] = handler
    return handler


def configure(config: Config, foreground: bool) -> None:
    """(Re)install handlers for ``config``; safe to call again on reload."""
    root = logging.getLogger("pmaster")
    root.setLevel(logging.INFO)
    wanted = {}
    main = _handler_for(config.core.logger, config, foreground)
    wanted["pmaster"] = main
    for ident, smtpd in config.smtpd.items():
        if smtpd.logger is not None:
            wanted["pmaster.smtpd.%s" % ident] = _handler_for(smtpd.logger, config, foreground)
    names = ["pmaster"] + ["pmaster.smtpd.%s" % i for i in config.smtpd]
    for name in names + sorted(_configured - set(names)):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        if name in wanted:
            logger.addHandler(_async(wanted[name]))
            logger.propagate = name == "pmaster"
        else:
            logger.propagate = True
    _configured.clear()
    _configured.update(wanted)
    while _pending_warnings:
        logging.getLogger("pmaster.logsetup").warning("%s", _pending_warnings.pop(0))
    in_use = set(id(h) for h in wanted.values())
    for key, h in list(_installed.items()):
        if id(h) not in in_use:
            flush()
            h.close()
            del _installed[key]
            _async_for.pop(id(h), None)


def hand_over(uid: int, gid: int) -> None:
    """Give the log files in use to the user the daemon is about to become; raises OSError on failure."""
    for handler in list(_installed.values()):
        if isinstance(handler, StrftimeFileHandler):
            handler.hand_over(uid, gid)
