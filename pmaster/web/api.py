"""The web admin's data and actions: the single source of what every page shows and the JSON API returns.

API: ``Api(config, spool, index, stats, logs, config_path, reload)``; ``config`` is a callable giving the
  running ``Config``; ``reload()`` reloads the daemon as SIGHUP does and returns None or the error.
  ``stats()``, ``queue(values, page, per_page)``, ``message(qid)``, ``act(action, ids, values)``,
  ``config_files()``, ``config_file(path)``, ``validate(path, text)``, ``apply(path, text, base)``,
  ``route(address, listener)``: plain dicts and lists, ready for ``json.dumps`` (the views escape them).
Invariants: queue actions go through ``queuecmd.perform``, the code of ``pmaster queue``; the route tester
  through ``routing.route_one``, the code of ``pmaster route``; validation through ``config`` as ``pmaster run``
  judges a file (machine problems are errors) plus ``routing.static_check``. A configuration file is written
  only when it validates and did not change on disk since the editor loaded it (``base``, its SHA-256):
  temp file, fsync, rename; the old file is kept as ``FILE.YYYYMMDDTHHMMSSZ.bak`` (the last ``KEEP_BACKUPS``).
Errors: bad input gives a dict with ``error`` (never an exception to the client); ``ApiError`` carries an HTTP
  status for unknown ids and bad requests.
"""

import datetime
import glob
import hashlib
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from pmaster import queuecmd
from pmaster.config import Config, config_files, load_with_diagnostics
from pmaster.errors import PmasterError, QueueIdError, SpoolError
from pmaster.routing import Router, route_one, static_check
from pmaster.spool import Spool, valid_queue_id
from pmaster.web.events import Stats
from pmaster.web.logstore import LogStore
from pmaster.web.queueindex import Filter, QueueIndex, read_headers

PREVIEW_BYTES = 8192
KEEP_BACKUPS = 10
MAX_PER_PAGE = 500
# The web admin's names for pmaster queue's actions ("retry now" is flush).
ACTIONS = {"retry": "flush", "hold": "hold", "release": "release", "delete": "delete", "bounce": "bounce"}
MAX_CONFIG_BYTES = 1024 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _iso(ts: Optional[float]) -> Optional[str]:
    if not ts:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Api:
    def __init__(self, config: Callable[[], Config], spool: Spool, index: QueueIndex, stats: Stats,
                 logs: LogStore, config_path: str, reload: Callable[[], Optional[str]]):
        self.config = config
        self.spool = spool
        self.index = index
        self.stats_source = stats
        self.logs = logs
        self.config_path = os.path.abspath(config_path)
        self.reload = reload

    # -- dashboard

    def stats(self) -> Dict[str, object]:
        if self.index.ready:  # never wait for the first look at a full queue: the numbers follow
            self.index.refresh()
        return self.stats_source.snapshot(self.index.counts())

    # -- queue

    def queue(self, values: Mapping[str, str], page: int = 1, per_page: int = 50) -> Dict[str, object]:
        flt = Filter.parse(values)
        per_page = max(1, min(MAX_PER_PAGE, per_page))
        page = max(1, page)
        now = time.time()
        if not self.index.ready and flt.empty():
            total, entries = self.index.unindexed_page((page - 1) * per_page, per_page)
        else:
            self.index.refresh()
            total, entries = self.index.query(flt, (page - 1) * per_page, per_page, now)
        return {
            "total": total, "page": page, "per_page": per_page, "pages": max(1, -(-total // per_page)),
            "filter": flt.as_dict(), "problems": flt.problems,
            "messages": [{
                "id": e.qid, "state": e.state(now), "sender": e.sender, "recipients": list(e.recipients),
                "size": e.size, "arrival": _iso(e.arrival), "subject": self.index.subject(e),
                "next_attempt": _iso(e.due) if e.due is not None and not e.held else None,
            } for e in entries],
        }

    def message(self, qid: str) -> Dict[str, object]:
        if not valid_queue_id(qid):
            raise ApiError(404, "no message %s in the queue" % qid)
        try:
            env = self.spool.load(qid)
        except QueueIdError:
            raise ApiError(404, "no message %s in the queue" % qid) from None
        except SpoolError as exc:
            raise ApiError(500, str(exc)) from None
        out = queuecmd.as_json(env, time.time())
        out.update({"helo": env.helo, "client_address": env.client_address, "client_name": env.client_name,
                    "listener": env.listener, "tls": env.tls, "is_bounce": env.is_bounce})
        headers = read_headers(self.spool, qid, 64 * 1024)
        out["headers"] = [[name, value] for name, value in headers]
        out["body_preview"], out["body_truncated"] = self._preview(qid)
        out["log"] = [{"time": _iso(t), "level": level, "message": message}
                      for t, level, message in self.logs.lines(qid)]
        return out

    def _preview(self, qid: str):
        try:
            with self.spool.open_body(qid) as f:
                raw = f.read(PREVIEW_BYTES + 64 * 1024)
        except (OSError, SpoolError):
            return "", False
        text = raw.replace(b"\r\n", b"\n")
        cut = text.find(b"\n\n")
        body = text[cut + 2:] if cut >= 0 else b""
        return body[:PREVIEW_BYTES].decode("utf-8", "replace"), len(body) > PREVIEW_BYTES

    def targets(self, ids: Sequence[str], values: Optional[Mapping[str, str]]) -> List[str]:
        """The messages an action applies to: the ids given, or everything matching the filter."""
        if values is not None:
            flt = Filter.parse(values)
            if flt.problems:
                raise ApiError(400, "; ".join(flt.problems))
            self.index.refresh(force=True)
            return self.index.select(flt)
        return [q for q in ids if q]

    def act(self, action: str, ids: Sequence[str] = (), values: Optional[Mapping[str, str]] = None
            ) -> Dict[str, object]:
        """Run ``action`` on each message; every message's effect (or error) is reported."""
        if action not in ACTIONS:
            raise ApiError(400, "unknown action %r (one of %s)" % (action, ", ".join(ACTIONS)))
        targets = self.targets(ids, values)
        results: List[Dict[str, object]] = []
        config = self.config()
        for qid in targets:
            try:
                effect = queuecmd.perform(self.spool, config, ACTIONS[action], qid)
                results.append({"id": qid, "ok": True, "effect": effect})
            except PmasterError as exc:  # QueueIdError, SpoolError, a report that cannot be stored
                results.append({"id": qid, "ok": False, "effect": "%s" % exc})
            self.index.forget(qid)
        done = sum(1 for r in results if r["ok"])
        return {"action": action, "count": len(targets), "done": done, "failed": len(results) - done,
                "results": results}

    # -- configuration

    def config_files(self) -> List[Dict[str, object]]:
        try:
            files = config_files(self.config_path)
        except PmasterError:
            files = [self.config_path]
        return [dict(path=f, **self._writable(f)) for f in files]

    def _writable(self, path: str) -> Dict[str, object]:
        directory = os.path.dirname(path) or "."
        if not os.access(path, os.W_OK):
            reason = "the daemon (uid %d) cannot write %s" % (os.getuid(), path)
        elif not os.access(directory, os.W_OK):
            reason = ("the daemon (uid %d) cannot write the directory %s (the new file and the backup go there)"
                      % (os.getuid(), directory))
        else:
            return {"writable": True, "reason": ""}
        return {"writable": False, "reason": reason}

    def _known_file(self, path: Optional[str]) -> str:
        path = os.path.abspath(path) if path else self.config_path
        known = [f["path"] for f in self.config_files()]
        if path not in known:
            raise ApiError(404, "%s is not part of the configuration" % path)
        return path

    def config_file(self, path: Optional[str] = None) -> Dict[str, object]:
        path = self._known_file(path)
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_CONFIG_BYTES).decode("utf-8", "replace")
        except OSError as exc:
            raise ApiError(500, "cannot read %s: %s" % (path, exc.strerror or exc)) from None
        out: Dict[str, object] = {"path": path, "text": text, "base": _sha(text), "main": path == self.config_path}
        out.update(self._writable(path))
        return out

    def validate(self, path: Optional[str], text: str) -> Dict[str, object]:
        path = self._known_file(path)
        texts = {path: text}
        try:
            config, diags = load_with_diagnostics(self.config_path, machine=True, texts=texts)
        except PmasterError as exc:
            return {"path": path, "valid": False, "diagnostics": [], "error": str(exc)}
        diags = list(diags)
        if config is not None:
            diags += static_check(config)
        items = [{"file": d.file, "line": d.line, "col": d.col, "severity": d.severity, "message": d.message,
                  "text": str(d)} for d in sorted(diags, key=lambda d: (d.file != path, d.file, d.line, d.col))]
        return {"path": path, "valid": not any(d["severity"] == "error" for d in items), "diagnostics": items,
                "error": ""}

    def apply(self, path: Optional[str], text: str, base: str) -> Dict[str, object]:
        path = self._known_file(path)
        result = self.validate(path, text)
        result.update({"applied": False, "backup": None, "reload_error": None})
        if not result["valid"]:
            result["error"] = result["error"] or "the configuration has errors: nothing was written"
            return result
        writable = self._writable(path)
        if not writable["writable"]:
            result["error"] = "read-only: %s" % writable["reason"]
            return result
        try:
            with open(path, "rb") as f:
                current = f.read(MAX_CONFIG_BYTES).decode("utf-8", "replace")
        except OSError as exc:
            result["error"] = "cannot read %s: %s" % (path, exc.strerror or exc)
            return result
        if _sha(current) != base:
            result["error"] = ("%s changed on disk since it was loaded: nothing was written; load it again "
                               "and redo the change" % path)
            result["conflict"] = True
            return result
        try:
            result["backup"] = self._write(path, text, current)
        except OSError as exc:
            result["error"] = "cannot write %s: %s" % (path, exc.strerror or exc)
            return result
        result["applied"] = True
        result["reload_error"] = self.reload()
        if result["reload_error"]:
            result["error"] = ("written, but the reload failed; the running configuration stays: %s"
                               % result["reload_error"])
        return result

    def _write(self, path: str, text: str, old: str) -> str:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        backup = "%s.%s.bak" % (path, stamp)
        mode = os.stat(path).st_mode & 0o7777
        _write_atomic(backup, old, mode)
        _write_atomic(path, text, mode)
        for stale in sorted(glob.glob(glob.escape(path) + ".*.bak"))[:-KEEP_BACKUPS]:
            try:
                os.unlink(stale)
            except OSError:
                pass
        return backup

    # -- route tester

    def route(self, address: str, listener: Optional[str] = None) -> Dict[str, object]:
        config = self.config()
        table = None
        if listener:
            smtpd = config.smtpd.get(listener)
            if smtpd is None:
                raise ApiError(400, "no listener %r (known: %s)" % (listener, ", ".join(sorted(config.smtpd))))
            table = smtpd.routing_table
        try:
            targets, refusal = route_one(Router(config), address, table)
        except PmasterError as exc:
            return {"address": address, "listener": listener, "results": [], "error": str(exc)}
        return {"address": address, "listener": listener, "table": table,
                "results": [t.as_json() for t in targets], "error": refusal or ""}


def _write_atomic(path: str, text: str, mode: int) -> None:
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
