"""Pickup: moves what ``pmaster sendmail`` dropped in ``maildrop/`` into the queue (Postfix's pickup + cleanup).

API: ``Pickup(snapshot, spool, notify, bounce, interval=0.5)``: ``start()`` (thread ``pickup``: one scan at
  once, then one every ``interval`` seconds), ``stop()``, ``scan_once() -> int`` (messages queued).
  ``snapshot() -> (Config, Router)`` is the runtime's; ``notify(qid)`` wakes the scheduler;
  ``bounce(envelope, failed, config, now)`` queues a non-delivery report (the scheduler's ``send_bounce``).
Per file: the sender and bare recipients are qualified with ``hostname``; recipients are routed with the
  unnamed ``[route]`` table as on a listener with ``local-rcpt-to = yes`` (a bare name may be a passwd user);
  the message gets ``Received: by HOST (Postmaster, from userid N)``, and ``From:``, ``Date:``, ``Message-ID:``
  when missing; the log line names ``uid=N``, the file's owner (what the submitter claims is ignored).
  A recipient without a route bounces (it cannot be refused any more: the command has exited); a routing
  error of the configuration (4xx) keeps the file in ``maildrop/`` for the next try, a minute later.
Invariants: a file leaves ``maildrop/`` only after its message is committed to the queue (a crash in between
  queues it twice rather than never), or into ``corrupt/maildrop.NAME`` with an error line when it cannot be
  read (cut short, garbage, unreadable, or never finished within ``STALE_SECONDS``). What is not a plain file
  with one link (a symlink, a hard link planted by a user) is removed: it was never a submission.
Threading: one thread; the scheduler and sessions share only the spool and ``notify``.
Errors: never raised out of the thread: a spool that cannot take a message (disk full) leaves the file where it
  is, logged, for the next scan.
"""

import email.utils
import errno
import logging
import os
import pwd
import re
import stat
import threading
import time
import uuid
from typing import Callable, Dict, List, Optional, Set, Tuple

from pmaster.config import Config
from pmaster.envelope import BOUNCED, Envelope, Recipient, split_address
from pmaster.errors import RouteError, SpoolError
from pmaster.routing import Router
from pmaster.spool import Spool, maildrop_corrupt_path, maildrop_directory
from pmaster.submit import message
from pmaster.submit.maildrop import Submission, is_complete, read_header

log = logging.getLogger("pmaster.pickup")

STALE_SECONDS = 3600.0  # a file its writer never finished (killed): moved to corrupt/ after this long
RETRY_SECONDS = 60.0  # after a temporary failure (configuration error, full spool)
HEAD_SNIFF = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _Deferred(Exception):
    """Leave the file for a later scan."""


class Pickup:
    def __init__(self, snapshot: Callable[[], Tuple[Config, Router]], spool: Spool,
                 notify: Callable[[str], object],
                 bounce: Callable[[Envelope, List[Recipient], Config, float], object],
                 interval: float = 0.5) -> None:
        self.snapshot = snapshot
        self.spool = spool
        self.notify = notify
        self.bounce = bounce
        self.interval = interval
        self.directory = maildrop_directory(spool.directory)
        self._retry_at: Dict[str, float] = {}
        self._stuck: Set[str] = set()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pickup", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_once()
            except Exception:  # noqa: BLE001 - the thread must survive whatever one scan meets
                log.exception("maildrop scan failed")
            self._stop.wait(self.interval)

    def scan_once(self) -> int:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return 0
        done = 0
        now = time.monotonic()
        for name in names:
            if self._stop.is_set():
                break
            if name in self._stuck or self._retry_at.get(name, 0.0) > now:
                continue
            try:
                if self._take(name):
                    done += 1
                self._retry_at.pop(name, None)
            except _Deferred:
                self._retry_at[name] = now + RETRY_SECONDS
        for name in [n for n in self._retry_at if n not in names]:
            del self._retry_at[name]
        return done

    # -- one file

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _take(self, name: str) -> bool:
        path = self._path(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            log.warning("maildrop: removing %s (uid=%d): not a plain file with one link", name, st.st_uid)
            _unlink(path)
            return False
        if not is_complete(st):
            if time.time() - st.st_mtime > STALE_SECONDS:
                self._quarantine(name, st.st_uid, "never finished by its writer")
            return False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self._quarantine(name, st.st_uid, "cannot open: %s" % (exc.strerror or exc))
            return False
        try:
            return self._take_open(name, fd, os.fstat(fd))
        finally:
            os.close(fd)

    def _take_open(self, name: str, fd: int, st: os.stat_result) -> bool:
        try:
            sub, offset, size = read_header(fd, st.st_size)
        except (ValueError, OSError) as exc:
            self._quarantine(name, st.st_uid, str(exc))
            return False
        config, router = self.snapshot()
        hostname = config.core.hostname
        sender = _qualify(sub.sender, hostname) if sub.sender else ""
        routed, failed = self._route(name, sub, router, hostname)
        writer = self._writer(name)
        try:
            qid = writer.queue_id
            body_type = self._copy(fd, offset, size, writer, sub, st.st_uid, sender, hostname, qid)
            now = time.time()
            env = Envelope(queue_id=qid, sender=sender, recipients=routed + failed, arrival=now,
                           client_address="127.0.0.1", client_name="localhost", listener="maildrop",
                           body_type=body_type, extra=_extra(sub, st.st_uid))
            writer.commit(env)
        except SpoolError as exc:
            writer.abort()
            log.error("maildrop: cannot queue %s (uid=%d): %s; trying again later", name, st.st_uid, exc)
            raise _Deferred() from None
        except OSError as exc:
            writer.abort()
            self._quarantine(name, st.st_uid, "cannot read: %s" % (exc.strerror or exc))
            return False
        log.info("%s: uid=%d from=<%s> size=%d nrcpt=%d (maildrop %s)", qid, st.st_uid, sender, env.size,
                 len(env.recipients), name)
        self._finish(env, failed, config, now)
        if not _unlink(self._path(name)):
            self._stuck.add(name)  # queued once is enough: never again from this file, until a restart
        return True

    def _writer(self, name: str):
        try:
            return self.spool.writer()
        except SpoolError as exc:
            log.error("maildrop: cannot queue %s: %s; trying again later", name, exc)
            raise _Deferred() from None

    def _route(self, name: str, sub: Submission, router: Router,
               hostname: str) -> Tuple[List[Recipient], List[Recipient]]:
        routed: List[Recipient] = []
        failed: List[Recipient] = []
        for given in sub.recipients:
            original = _qualify(given, hostname)
            try:
                targets = router.resolve(given, None, local_rcpt_to=True)
            except RouteError as exc:
                if exc.reply.code < 500:
                    log.warning("maildrop: %s: <%s>: %s; trying again later", name, given, exc.reply)
                    raise _Deferred() from None
                failed.append(_bounced(original, str(exc.reply), exc.reply.enhanced or "5.1.1"))
                continue
            if any(t.extension.startswith("-") for t in targets):
                failed.append(_bounced(original, "553 5.1.3 <%s>: bad address extension" % original, "5.1.3"))
                continue
            for t in targets:
                routed.append(Recipient(address=t.address, original=original, mailer=t.mailer, target=t.target,
                                        extension=t.extension))
        return routed, failed

    def _copy(self, fd: int, offset: int, size: int, writer, sub: Submission, uid: int, sender: str,
              hostname: str, qid: str) -> str:
        """Stream the body into the spool behind our headers; returns the body type."""
        head = os.pread(fd, min(size, HEAD_SNIFF), offset)
        end, separated = message.header_end(head, complete=len(head) == size)
        present = message.field_names(head[:end] if end is not None else head)
        writer.write(_received(hostname, uid, qid).encode("utf-8"))
        writer.write(_missing_fields(present, sub, uid, sender, hostname, qid).encode("utf-8"))
        eight_bit = not head.isascii()
        if end is not None and not separated:
            writer.write(head[:end] + b"\r\n" + head[end:])  # RFC 5322: header and body apart
        else:
            writer.write(head)
        pos = offset + len(head)
        stop = offset + size
        while pos < stop:
            chunk = os.pread(fd, min(1 << 16, stop - pos), pos)
            if not chunk:
                raise OSError(errno.EIO, "maildrop file shrank while read")
            eight_bit = eight_bit or not chunk.isascii()
            writer.write(chunk)
            pos += len(chunk)
        if sub.body_type == "8BITMIME" or eight_bit:
            return "8BITMIME"
        return "7BIT"

    def _finish(self, env: Envelope, failed: List[Recipient], config: Config, now: float) -> None:
        for r in failed:
            log.info("%s: to=<%s> mailer=none status=bounced delay=0.0 (%s)", env.queue_id, r.address, r.last_reply)
        if failed:
            try:
                report = self.bounce(env, failed, config, now)
                if report:
                    self.notify(report)
            except SpoolError as exc:
                log.error("%s: cannot queue the non-delivery report: %s", env.queue_id, exc)
        if env.done():
            try:
                with self.spool.lock(env.queue_id):
                    self.spool.remove(env.queue_id)
                log.info("%s: removed", env.queue_id)
            except SpoolError as exc:
                log.warning("%s: cannot remove: %s (the scheduler will)", env.queue_id, exc)
                self.notify(env.queue_id)
            return
        self.notify(env.queue_id)

    def _quarantine(self, name: str, uid: int, reason: str) -> None:
        target = maildrop_corrupt_path(self.spool.directory, name)
        try:
            os.rename(self._path(name), target)
        except OSError as exc:
            log.error("maildrop: %s (uid=%d): %s; cannot move it to corrupt/: %s", name, uid, reason,
                      exc.strerror or exc)
            return
        log.error("maildrop: %s (uid=%d): %s; moved to %s", name, uid, reason, target)


def _qualify(address: str, hostname: str) -> str:
    _, domain = split_address(address)
    return address if domain else "%s@%s" % (address, hostname)


def _bounced(address: str, reply: str, status: str) -> Recipient:
    return Recipient(address=address, original=address, mailer="relay", target="none", state=BOUNCED,
                     attempts=1, last_reply=reply, dsn_status=status)


def _extra(sub: Submission, uid: int) -> Dict[str, object]:
    extra: Dict[str, object] = {"uid": uid}
    for key in ("envid", "notify", "ret"):
        value = getattr(sub, key)
        if value:
            extra[key] = value
    return extra


def _received(hostname: str, uid: int, qid: str) -> str:
    # Postfix's form for local submissions: no client, the submitting user id instead.
    return "Received: by %s (Postmaster, from userid %d)\r\n\tid %s; %s\r\n" % (
        hostname, uid, qid, email.utils.formatdate(localtime=True))


def _missing_fields(present, sub: Submission, uid: int, sender: str, hostname: str, qid: str) -> str:
    out = ""
    if "from" not in present:
        address = sender or _qualify(_login(uid), hostname)
        name = _CONTROL.sub(" ", sub.full_name).strip()
        out += "From: %s\r\n" % (email.utils.formataddr((name, address)) if name else address)
    if "date" not in present:
        out += "Date: %s\r\n" % email.utils.formatdate(localtime=True)
    if "message-id" not in present:
        out += "Message-ID: <%s.%s@%s>\r\n" % (qid, uuid.uuid4().hex[:12], hostname)
    return out


def _login(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid%d" % uid


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("maildrop: cannot remove %s: %s (queued already; it is skipped until a restart)", path,
                  exc.strerror or exc)
        return False
    return True
