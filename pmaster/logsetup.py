"""Logging back-ends: stderr, syslog and ``[logfile]`` files named by a strftime pattern.

API: ``configure(config, foreground) -> None`` installs handlers on the ``pmaster`` logger tree:
  ``[core] logger`` for everything, and a listener's own ``logger`` for ``pmaster.smtpd.<ident>``.
  ``StrftimeFileHandler(pattern)``: expands the pattern at each write, so a new day opens a new file.
Invariants: one line per event; no tracebacks in syslog lines (they are folded onto one line).
  When syslog cannot be reached, stderr is used with one warning (SPEC 2).
"""

import logging
import logging.handlers
import os
import sys
import threading
import time
from typing import Dict, Optional

from pmaster.config import Config

_FORMAT_FILE = "%(asctime)s %(name)s[%(process)d]: %(levelname)s: %(message)s"
_FORMAT_STDERR = "%(asctime)s %(name)s: %(levelname)s: %(message)s"
_installed: Dict[str, logging.Handler] = {}


class StrftimeFileHandler(logging.Handler):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = pattern
        self._path: Optional[str] = None
        self._stream = None
        self._io = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).replace("\n", " | ") + "\n"
            path = time.strftime(self.pattern)
            with self._io:
                if path != self._path:
                    self._open(path)
                self._stream.write(line)
                self._stream.flush()
        except Exception:
            self.handleError(record)

    def _open(self, path: str) -> None:
        if self._stream is not None:
            self._stream.close()
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._stream = open(path, "a", encoding="utf-8")
        self._path = path

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
    handler = _stderr_handler()
    logging.getLogger("pmaster").warning("syslog is not reachable (no /dev/log): logging to stderr")
    return handler


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT_STDERR))
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
        handler.setFormatter(logging.Formatter(_FORMAT_FILE))
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
    for name in ["pmaster"] + ["pmaster.smtpd.%s" % i for i in config.smtpd]:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        if name in wanted:
            logger.addHandler(wanted[name])
            logger.propagate = name == "pmaster"
        else:
            logger.propagate = True
    in_use = set(id(h) for h in wanted.values())
    for key, h in list(_installed.items()):
        if id(h) not in in_use:
            h.close()
            del _installed[key]
