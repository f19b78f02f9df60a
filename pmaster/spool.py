"""Durable spool: one record per message, the only module that knows spool paths and the record format.

API:
  ``new_queue_id() -> str``: a fresh id: 13 hex digits of microseconds since the epoch, then 5 random
    characters; ``[0-9A-Z]`` only, so it is safe as a file name and sorts by arrival.
  ``Spool(directory, recycle=False, background_removals=False)``: creates ``tmp/ queue/ corrupt/ free/``
    (mode 0o700) and a ``VERSION`` marker; ``recycle=True`` (the daemon) reuses removed records' files (see
    ``_Recycler``); ``background_removals=True`` (the daemon) makes ``remove`` return before the directory
    fsync that makes it durable, which a thread of the spool runs at once (``wait_removals_synced``).
    ``writer()`` starts a message (``SpoolWriter``: ``write``, ``commit``, ``abort``, ``stamp`` after the
    commit; a context manager);
    ``ids()``, ``load(qid)``, ``save(env)``, ``stamp(qid)``, ``body_path(qid)``, ``open_body(qid)``,
    ``body_size(qid)``, ``exists(qid)``, ``remove(qid)``, ``lock(qid, timeout=None)``, ``try_lock(qid)``,
    ``recover()``, ``corrupt_ids()``, ``free_space()``, ``env_path(qid)``, ``wait_removals_synced()``
    (``SpoolLock.stamp()`` is ``stamp`` for the holder of the lock, one stat cheaper); ``trigger_path()`` and
    ``touch_trigger()`` (``pmaster queue`` tells a running daemon that it changed the spool).
  ``open_body_file(path)``, ``body_file_size(path)``: the body of the record at ``body_path(qid)`` (what
    mailers read); ``record_trailer(body_size, env)``: the bytes that follow a body in its record.
Layout: ``tmp/`` holds files being written. ``queue/ID.msg`` is the record: the body as received, then the
  envelope of the commit (one JSON line, ``Envelope.to_json``), then a fixed-length footer line
  ``#pmaster-record body=N envelope=M`` giving both lengths. It is written once and never rewritten, so a
  message costs one file (one inode, one fsync), as a Postfix queue file does. ``queue/ID.env`` appears
  when the envelope changes after the commit (delivery attempts, ``pmaster queue``): a JSON envelope
  replaced atomically by ``save`` that takes precedence over the trailer. ``corrupt/`` holds records that
  could not be read; ``free/`` holds removed records, emptied, until a new message reuses the file (only
  a recycling spool puts them there; the daemon deletes what a previous run left); ``trigger`` is an empty file whose modification time changes whenever something
  outside the daemon changed the queue (the scheduler polls it: Postfix's trigger to qmgr, as a time stamp).
Invariants: a message is committed when ``queue/ID.msg`` exists; it is renamed there complete and fsynced.
  ``remove`` takes the record out of ``queue/`` first (unlink, or rename into ``free/``) and ``ID.env``
  second: an ``ID.env`` without its record is what an
  interrupted removal leaves, and counts as removed (``recover`` deletes it). Every write is temp file,
  fsync, rename, fsync of ``queue/`` (SPEC 4: ``250`` after DATA only once ``commit`` has returned).
  Concurrent commits share the ``queue/`` fsync (group commit): each caller waits for one directory fsync
  that started after its rename; durability is never traded for speed.
Threading: ``Spool`` is safe to share between threads and processes. ``save``, ``remove`` and every
  read-modify-write of an envelope must run under ``lock(qid)``: an exclusive ``flock`` on the record
  itself, through an fd of its own, so it excludes other threads as well as other processes such as the
  ``pmaster queue`` CLI; locks do not nest. ``recover`` runs at daemon start only, while no other process
  writes into the spool.
Errors: ``SpoolError`` for storage failures and unreadable records (which move to ``corrupt/``),
  ``QueueIdError`` (a ``SpoolError``) for an unknown or malformed queue id. A writer that fails removes
  everything it wrote before raising. ``open_body_file`` raises ``OSError`` (``EIO`` for a file that is no
  record). Daemons should ignore ``SIGXFSZ`` so a file size limit gives ``EFBIG`` (a ``SpoolError``)
  instead of killing the process.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import io
import logging
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from pmaster.envelope import Envelope
from pmaster.errors import QueueIdError, SpoolError

log = logging.getLogger("pmaster.spool")

SPOOL_FORMAT = 2  # 1: separate ID.env written at commit, lock files in locks/
VERSION_FILE = "VERSION"
TMP, QUEUE, CORRUPT, FREE = "tmp", "queue", "corrupt", "free"
TRIGGER_FILE = "trigger"
FLUSH_FILE = "flush"  # touched by `pmaster queue flush`: the daemon forgets which hosts refused (SPEC 9)
# Local submission (SPEC 10): any local user may create files here but not list or read the directory: sticky
# (only a file's owner or the daemon may remove or rename it), setgid (files take the spool's group, which the
# daemon reads them through), mode 3733; the spool directory itself needs search permission for all (0711).
MAILDROP = "maildrop"
MAILDROP_MODE = 0o3733
BODY_SUFFIX, ENV_SUFFIX = ".msg", ".env"
_FOOTER = b"#pmaster-record body=%016d envelope=%010d\n"
_FOOTER_LEN = len(_FOOTER % (0, 0))
_FOOTER_RE = re.compile(rb"#pmaster-record body=([0-9]{16}) envelope=([0-9]{10})\n")

_ID_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ID_RANDOM = 5
_ID_RE = re.compile(r"[0-9A-Z]{13,64}")
_ALLOCATE_TRIES = 100
_LOCK_POLL = 0.02
_WRITE_BUFFER = 64 * 1024
_RECYCLE_AGE = 5.0  # seconds a removed record rests before reuse: whoever had it open is done with it by then
_RECYCLE_MAX = 4096  # records kept for reuse at most; beyond that a removal unlinks
_SMALL_RECORD = 64 * 1024  # records below this size are read whole by ``open_body_file``
_RIDE_ALONG_WAIT = 0.02  # a removal waits this long for a commit's directory fsync before its own

_id_lock = threading.Lock()
_id_last_us = 0


def new_queue_id() -> str:
    """Return an id that sorts after every id this process made before (and by arrival across processes)."""
    global _id_last_us
    with _id_lock:
        # Strictly increasing within the process, even when the clock stands still or steps back.
        now_us = max(time.time_ns() // 1000, _id_last_us + 1)
        _id_last_us = now_us
    suffix = "".join(_id_random().choices(_ID_CHARS, k=_ID_RANDOM))
    return f"{now_us:013X}{suffix}"


_rng: "list[random.Random]" = []


def _id_random() -> "random.Random":
    """A generator seeded from the OS once per process: the suffix only separates processes and threads
    that share a microsecond, so it needs no system call per character (a fork gets a new seed)."""
    if not _rng:
        _rng.append(random.Random(secrets.randbits(64)))
    return _rng[0]


os.register_at_fork(after_in_child=_rng.clear)


def maildrop_directory(spool_directory: str) -> str:
    """Where ``pmaster sendmail`` drops messages for the daemon's pickup."""
    return os.path.join(os.path.abspath(spool_directory), MAILDROP)


def prepare_maildrop(spool_directory: str) -> str:
    """Create ``maildrop/`` (and the spool directory) if needed and set their modes; returns the path.

    Called by the daemon after it dropped privileges (it owns the spool then) and by ``pmaster sendmail``
    run by root before the daemon ever started; ``OSError`` when the caller may not.
    """
    top = os.path.abspath(spool_directory)
    path = maildrop_directory(top)
    os.makedirs(top, mode=0o711, exist_ok=True)
    mode = os.stat(top).st_mode & 0o7777
    if mode & 0o011 != 0o011:
        os.chmod(top, mode | 0o011)  # search, not list: the queue stays unreadable to others
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path):
        raise OSError(errno.ENOTDIR, "not a directory", path)
    if st.st_gid != os.stat(top).st_gid and os.geteuid() == 0:
        os.chown(path, -1, os.stat(top).st_gid)
    if st.st_mode & 0o7777 != MAILDROP_MODE:
        os.chmod(path, MAILDROP_MODE)
    return path


def maildrop_corrupt_path(spool_directory: str, name: str) -> str:
    """Where a maildrop file that cannot be read goes: ``corrupt/maildrop.NAME``."""
    return os.path.join(os.path.abspath(spool_directory), CORRUPT, "maildrop." + name)


def valid_queue_id(qid: str) -> bool:
    return isinstance(qid, str) and _ID_RE.fullmatch(qid) is not None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot fsync a directory; there is nothing more we can do there.
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


class _DirSync:
    """fsync of one directory through a descriptor kept open: two system calls fewer per message."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._open_lock = threading.Lock()

    def __call__(self) -> None:
        fd = self._fd
        if fd is None:
            with self._open_lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0))
                fd = self._fd
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # as in _fsync_dir
                raise

    def __del__(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def record_trailer(body_size: int, env: Envelope) -> bytes:
    """What follows ``body_size`` octets of body in a record: the envelope line and the footer."""
    line = env.to_json().encode("utf-8")  # one line, ending in LF
    return line + _FOOTER % (body_size, len(line))


def _read_footer(fd: int) -> tuple[int, int]:
    """(body size, envelope length) of the record open at ``fd``; ``ValueError`` when it is no record."""
    size = os.fstat(fd).st_size
    if size < _FOOTER_LEN:
        raise ValueError("no record trailer (file of %d octets)" % size)
    return _parse_footer(os.pread(fd, _FOOTER_LEN, size - _FOOTER_LEN), size)


def _parse_footer(footer: bytes, size: int) -> tuple[int, int]:
    """(body size, envelope length) from the last ``_FOOTER_LEN`` octets of a record of ``size`` octets."""
    match = _FOOTER_RE.fullmatch(footer)
    if match is None:
        raise ValueError("no record trailer")
    body, env_len = int(match.group(1)), int(match.group(2))
    if body + env_len + _FOOTER_LEN != size:
        raise ValueError("record trailer does not match the file size")
    return body, env_len


def _read_trailer_envelope(path: str) -> bytes:
    """The envelope line stored in the record at ``path`` (``ValueError`` when there is none)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        body, env_len = _read_footer(fd)
        raw = os.pread(fd, env_len, body)
    finally:
        os.close(fd)
    if len(raw) != env_len:
        raise ValueError("record shorter than its trailer says")
    return raw


class _BodyRaw(io.RawIOBase):
    """Raw reads of the first ``size`` octets of a record: the body without the trailer."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._fd = fd
        self._left = size

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = min(len(buffer), self._left)
        if n <= 0:
            return 0
        got = os.readv(self._fd, [memoryview(buffer)[:n]])
        if got == 0:
            # Shorter than its footer said: removed and emptied under us. Never let a mailer take the
            # part read so far for the whole message.
            raise OSError(errno.EIO, "spool record ended %d octets before its body's end" % self._left)
        self._left -= got
        return got

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


def open_body_file(path: str) -> BinaryIO:
    """A buffered reader of the body stored in the record at ``path`` (it ends where the body ends).

    A record smaller than ``_SMALL_RECORD`` (most mail) comes in with one read, footer and all, and is
    served from memory: two system calls fewer per delivery than finding the footer first.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.read(fd, _SMALL_RECORD)
        small = len(head) < _SMALL_RECORD  # a short read of a regular file: the whole record
        if small:
            if len(head) < _FOOTER_LEN:
                raise ValueError("no record trailer (file of %d octets)" % len(head))
            size, _ = _parse_footer(head[-_FOOTER_LEN:], len(head))
        else:
            size, _ = _read_footer(fd)
            os.lseek(fd, 0, os.SEEK_SET)
    except ValueError as exc:
        os.close(fd)
        raise OSError(errno.EIO, f"not a spool record: {exc}") from None
    except BaseException:
        os.close(fd)
        raise
    if small:
        os.close(fd)
        return io.BytesIO(head[:size])  # type: ignore[return-value]
    return io.BufferedReader(_BodyRaw(fd, size), 1 << 16)  # type: ignore[return-value]


def body_file_size(path: str) -> int:
    """Octets of body in the record at ``path``; ``OSError`` as ``open_body_file``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_footer(fd)[0]
    except ValueError as exc:
        raise OSError(errno.EIO, f"not a spool record: {exc}") from None
    finally:
        os.close(fd)


class GroupSync:
    """Shares one expensive ``sync_fn`` call (a directory fsync) between concurrent callers.

    ``sync()`` returns only after a call of ``sync_fn`` that started after ``sync()`` was entered has
    finished; it returns that call's generation number. One caller (the leader) runs ``sync_fn`` while the
    others wait on the condition; a caller that arrives while a sync runs waits for the next one, because
    the running one may have started before the caller's rename. A failed sync raises its ``OSError`` in
    every caller it was meant to cover (after a failed fsync a later one proves nothing).
    """

    _KEEP_FAILURES = 64

    def __init__(self, sync_fn: Callable[[], None]) -> None:
        self._sync_fn = sync_fn
        self._cond = threading.Condition()
        self._started = 0
        self._completed = 0
        self._running = False
        self._failures: dict[int, OSError] = {}

    def sync(self) -> int:
        with self._cond:
            need = self._started + 1
            while self._completed < need:
                if self._running:
                    self._cond.wait()
                    continue
                self._lead()
            failure = self._failures.get(need)
        if failure is not None:
            raise failure
        return need

    def ticket(self) -> int:
        """The generation of the first sync that will start after now (for ``wait_covered``)."""
        with self._cond:
            return self._started + 1

    def wait_covered(self, ticket: int, timeout: float) -> bool:
        """Wait up to ``timeout`` for another caller's sync of generation ``ticket`` or later to succeed."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._completed < ticket:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._completed not in self._failures

    def _lead(self) -> None:
        """Run one sync with the condition released; called and returns with it held."""
        self._running = True
        self._started += 1
        gen = self._started
        failure: OSError | None = None
        finished = False
        self._cond.release()
        try:
            self._sync_fn()
            finished = True
        except OSError as exc:
            failure = exc
        finally:
            self._cond.acquire()
            if not finished and failure is None:
                # Interrupted by something else: the followers must not take it for a success.
                failure = OSError(errno.EIO, "directory sync interrupted")
            self._running = False
            self._completed = gen
            if failure is not None:
                self._record_failure(gen, failure)
            self._cond.notify_all()

    def _record_failure(self, gen: int, failure: OSError) -> None:
        self._failures[gen] = failure
        for old in [g for g in self._failures if g <= gen - self._KEEP_FAILURES]:
            del self._failures[old]


class _BackgroundSync:
    """Runs a ``GroupSync`` soon after ``request()``, in a thread of its own, so a removal need not wait.

    A delivery worker that removed a delivered record goes on at once; the ``spool-sync`` thread makes
    the removal durable within ``_RIDE_ALONG_WAIT`` and an fsync: by the directory fsync of a commit that
    started after it, or else by one of its own. Only a crash of the machine in between can bring the
    message back, which counts as a crash during its delivery (SPEC 5); killing the daemon cannot, the
    kernel keeps the rename. The thread starts on first use.
    """

    def __init__(self, group: GroupSync) -> None:
        self._group = group
        self._cond = threading.Condition()
        self._requested = 0
        self._ticket = 0
        self._done = 0
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        with self._cond:
            self._requested += 1
            self._ticket = self._group.ticket()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="spool-sync", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every removal requested so far is synced; False when ``timeout`` ran out first."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._requested
            while self._done < target:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._done >= self._requested:
                    self._cond.wait()
                target, ticket = self._requested, self._ticket
            # Under load the commits of new messages fsync the same directory every few milliseconds: one of
            # those that starts after the removal makes it durable as well, at no cost. Otherwise sync here.
            try:
                if not self._group.wait_covered(ticket, _RIDE_ALONG_WAIT):
                    self._group.sync()
            except OSError as exc:
                log.error("cannot sync the queue directory after removals: %s (a crash of the machine "
                          "could bring delivered messages back)", exc)
            with self._cond:
                self._done = target
                self._cond.notify_all()


def _stamp(saved: int, st: os.stat_result) -> tuple[int, int, int, int]:
    """A ``Spool.stamp``: whether ``ID.env`` exists, and the identity of the file that holds the envelope."""
    return saved, st.st_ino, st.st_mtime_ns, st.st_size


class SpoolLock:
    """An exclusive ``flock`` on the record ``queue/ID.msg``; use ``with spool.lock(qid):``.

    Each lock opens its own fd, so it excludes other threads as well as other processes. ``remove`` unlinks
    the record while holding the lock; a waiter that then gets the lock on the unlinked inode notices (the
    path names no file) and holds the lock of a message that is gone. Locking a message that does not exist
    succeeds at once (queue ids are never reused, so there is nothing to exclude): what the caller does
    next under the lock (``load``, ``save``, ``remove``) then answers ``QueueIdError``.
    """

    _GONE = -1  # ``_fd`` of a lock held on a message that does not exist

    def __init__(self, spool: "Spool", qid: str) -> None:
        self.queue_id = qid
        self._path = spool._path(QUEUE, qid, BODY_SUFFIX)
        self._env_path = spool._path(QUEUE, qid, ENV_SUFFIX)
        self._fd: int | None = None
        self._record: os.stat_result | None = None  # the locked record, as fstat saw it

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if self._fd is not None:
            return True
        if not blocking or timeout is None:
            return self._acquire_once(blocking)
        deadline = time.monotonic() + timeout
        while not self._acquire_once(False):
            if time.monotonic() >= deadline:
                return False
            time.sleep(_LOCK_POLL)
        return True

    def _acquire_once(self, blocking: bool) -> bool:
        flags = fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._fd = self._GONE
            return True
        except OSError as exc:
            raise SpoolError(f"{self.queue_id}: cannot open for locking: {exc}") from exc
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise SpoolError(f"{self.queue_id}: cannot lock: {exc}") from exc
        if self._same_file(fd):
            self._fd = fd
        else:
            os.close(fd)  # removed (or quarantined) while we waited: the message is gone
            self._fd = self._GONE
        return True

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return False
        mine = self._record = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def stamp(self) -> tuple[int, int, int, int]:
        """``Spool.stamp`` of the locked message with one stat fewer: the record cannot change under the lock
        (it is written once; removals need the lock), so only ``ID.env`` is looked at. ``OSError`` if gone."""
        if self._fd is None or self._fd == self._GONE or self._record is None:
            raise FileNotFoundError(errno.ENOENT, "message gone", self._path)
        try:
            st = os.stat(self._env_path)
        except FileNotFoundError:
            return _stamp(0, self._record)
        return _stamp(1, st)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        self._record = None
        if fd is not None and fd != self._GONE:
            os.close(fd)  # closing the only fd of this open file description drops the flock

    def __enter__(self):  # returns self
        if not self.acquire():
            raise SpoolError(f"{self.queue_id}: cannot lock")  # pragma: no cover - blocking never fails
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class _Recycler:
    """Removed records kept in ``free/`` (emptied) and reused as new records: no inode freed and allocated
    per message. On ext4 without a journal the inode allocator steps over every inode freed in the last
    minutes, one buffer look-up each; at a few hundred messages a second that came to a sixth of the
    daemon's CPU and grew with the load. Entries are reused oldest first, and only after ``_RECYCLE_AGE``.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._entries: collections.deque[tuple[float, str]] = collections.deque()
        # What the last run kept is deleted, not reused: after a crash a file system without a journal
        # may still show a name here for an inode that went on to become a queued record, so a name that
        # shares an inode with a queued file is only dropped from free/ when the link count allows it.
        queued = set()
        with os.scandir(os.path.join(os.path.dirname(directory), QUEUE)) as entries:
            for entry in entries:
                queued.add(entry.inode())
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if st.st_ino in queued and st.st_nlink < 2:
                log.error("%s shares its inode with a queued message and a link count of 1: left alone "
                          "(run fsck on the spool's file system)", path)
                continue
            _unlink_quietly(path)

    def take(self, path: str) -> int | None:
        """Move a kept file to ``path`` and open it, empty, for writing; None when none is ready."""
        with self._lock:
            if not self._entries or self._entries[0][0] > time.monotonic() - _RECYCLE_AGE:
                return None
            _, name = self._entries.popleft()
        try:
            os.rename(os.path.join(self.directory, name), path)
            return os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            _unlink_quietly(path)
            return None

    def keep(self, path: str) -> bool:
        """Move the record at ``path`` into ``free/`` and empty it; False when the pool is full (unlink it).

        ``FileNotFoundError`` when there is no file at ``path``.
        """
        with self._lock:
            if len(self._entries) >= _RECYCLE_MAX:
                return False
        name = new_queue_id()
        kept = os.path.join(self.directory, name)
        os.rename(path, kept)  # first: the record is gone from queue/ in one step
        try:
            os.truncate(kept, 0)  # delivered mail does not linger (and its blocks are freed now)
        except OSError as exc:
            log.warning("cannot empty %s: %s", kept, exc)
            _unlink_quietly(kept)
            return True
        with self._lock:
            self._entries.append((time.monotonic(), name))
        return True

    def __len__(self) -> int:
        return len(self._entries)


class Spool:
    """The spool directory; see the module docstring for layout and rules."""

    def __init__(self, directory: str, group_commit: bool = True, recycle: bool = False,
                 background_removals: bool = False) -> None:
        self.directory = os.path.abspath(directory)
        self._queue_dir = os.path.join(self.directory, QUEUE)
        self._prefixes: dict[str, str] = {}  # "tmp" -> "/spool/tmp/": four paths per message are built
        self._group_commit = group_commit
        self._queue_dir_sync = _DirSync(self._queue_dir)
        self._queue_sync = GroupSync(self._queue_dir_sync)
        self._removal_sync = _BackgroundSync(self._queue_sync) if background_removals else None
        self._free_cache: tuple[float, int] | None = None
        self._create_directories()
        self._check_version()
        # Only the daemon recycles (it is the only writer of new records); elsewhere a removal unlinks.
        self._recycler = self._open_recycler() if recycle else None

    def _open_recycler(self) -> _Recycler | None:
        try:
            return _Recycler(os.path.join(self.directory, FREE))
        except OSError as exc:
            log.warning("not reusing spool files: %s", exc)
            return None

    # -- layout ---------------------------------------------------------------------------------------

    def _create_directories(self) -> None:
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            for sub in (TMP, QUEUE, CORRUPT, FREE):
                os.makedirs(os.path.join(self.directory, sub), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"spool directory {self.directory}: {exc.strerror or exc}") from exc

    def _check_version(self) -> None:
        path = os.path.join(self.directory, VERSION_FILE)
        try:
            with open(path, "r", encoding="ascii") as f:
                text = f.read().strip()
        except FileNotFoundError:
            self._write_version(path)
            return
        except (OSError, ValueError) as exc:
            raise SpoolError(f"spool directory {self.directory}: unreadable {VERSION_FILE}: {exc}") from exc
        if text != str(SPOOL_FORMAT):
            raise SpoolError(f"spool directory {self.directory}: format {text!r}, "
                             f"this version reads format {SPOOL_FORMAT}")

    def _write_version(self, path: str) -> None:
        try:
            tmp = self._write_temp(f"{SPOOL_FORMAT}\n".encode("ascii"), "VERSION")
            os.rename(tmp, path)
            _fsync_dir(self.directory)
        except OSError as exc:
            raise SpoolError(f"spool directory {self.directory}: cannot write {VERSION_FILE}: {exc}") from exc

    def _path(self, sub: str, qid: str, suffix: str) -> str:
        if not valid_queue_id(qid):
            raise QueueIdError(f"invalid queue id: {qid!r}")
        prefix = self._prefixes.get(sub)
        if prefix is None:
            prefix = self._prefixes[sub] = os.path.join(self.directory, sub, "")
        return prefix + qid + suffix

    def _sync_queue_dir(self) -> None:
        if self._group_commit:
            self._queue_sync.sync()
        else:
            self._queue_dir_sync()

    def _write_temp(self, data: bytes, stem: str) -> str:
        """Write ``data`` to a new fsynced file in ``tmp/`` and return its path; nothing is left on failure."""
        for _ in range(_ALLOCATE_TRIES):
            path = os.path.join(self.directory, TMP, f"{stem}.{_id_random().getrandbits(48):012x}.tmp")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                continue
        else:
            raise OSError(errno.EEXIST, "cannot allocate a temporary file")
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _unlink_quietly(path)
            raise
        return path

    def _install_env(self, env: Envelope) -> None:
        """Atomically replace ``queue/ID.env`` (temp file and fsync; the caller fsyncs ``queue/``)."""
        tmp = self._write_temp(env.to_json().encode("utf-8"), env.queue_id)
        try:
            os.rename(tmp, self._path(QUEUE, env.queue_id, ENV_SUFFIX))
        except BaseException:
            _unlink_quietly(tmp)
            raise

    # -- writing --------------------------------------------------------------------------------------

    def writer(self) -> "SpoolWriter":
        return SpoolWriter(self)

    def save(self, env: Envelope) -> None:
        """Replace the envelope of a queued message; the record is not touched. Hold ``lock(qid)``."""
        qid = env.queue_id
        if not os.path.exists(self._path(QUEUE, qid, BODY_SUFFIX)):
            raise QueueIdError(f"{qid}: no such message")
        try:
            self._install_env(env)
            self._sync_queue_dir()
        except OSError as exc:
            raise SpoolError(f"{qid}: cannot save envelope: {exc}") from exc

    def remove(self, qid: str, env_saved: bool = True) -> None:
        """Delete a message: the record first (then it is gone), the saved envelope second.

        ``env_saved=False``: the caller holds the lock and its ``stamp`` showed no ``ID.env`` (saves need the
        lock, so none appeared since): one unlink fewer.
        """
        body_path = self._path(QUEUE, qid, BODY_SUFFIX)
        env_path = self._path(QUEUE, qid, ENV_SUFFIX)
        try:
            try:
                self._discard(body_path)
            except FileNotFoundError:
                _unlink_quietly(env_path)  # what an interrupted removal may have left
                raise QueueIdError(f"{qid}: no such message") from None
            if env_saved:
                _unlink_quietly(env_path)
            # Durable removal: otherwise a crash could bring a delivered message back. The daemon's workers
            # leave the directory fsync to the spool-sync thread (``_BackgroundSync``).
            if self._removal_sync is not None:
                self._removal_sync.request()
            else:
                self._sync_queue_dir()
        except QueueIdError:
            raise
        except OSError as exc:
            raise SpoolError(f"{qid}: cannot remove: {exc}") from exc

    def wait_removals_synced(self, timeout: float | None = None) -> bool:
        """With ``background_removals``: wait until the removals made so far are on disk (at shutdown)."""
        return self._removal_sync is None or self._removal_sync.wait(timeout)

    def _discard(self, record_path: str) -> None:
        """Take a record out of ``queue/``: kept for reuse when recycling, else unlinked."""
        if self._recycler is not None:
            try:
                if self._recycler.keep(record_path):
                    return
            except FileNotFoundError:
                raise
            except OSError as exc:
                log.warning("cannot keep %s for reuse: %s (deleting it)", record_path, exc)
        os.unlink(record_path)

    # -- reading --------------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Committed queue ids (those with a record), in arrival order."""
        try:
            names = os.listdir(self._queue_dir)
        except OSError as exc:
            raise SpoolError(f"cannot list {self._queue_dir}: {exc}") from exc
        return sorted(n[:-len(BODY_SUFFIX)] for n in names
                      if n.endswith(BODY_SUFFIX) and valid_queue_id(n[:-len(BODY_SUFFIX)]))

    def listing(self) -> tuple[list[str], set[str]]:
        """One look at ``queue/``: (committed ids in arrival order, the ids among them with a saved envelope).

        For an index of the queue (the web admin): only the messages with ``ID.env`` can have changed."""
        try:
            names = os.listdir(self._queue_dir)
        except OSError as exc:
            raise SpoolError(f"cannot list {self._queue_dir}: {exc}") from exc
        ids = sorted(n[:-len(BODY_SUFFIX)] for n in names
                     if n.endswith(BODY_SUFFIX) and valid_queue_id(n[:-len(BODY_SUFFIX)]))
        saved = {n[:-len(ENV_SUFFIX)] for n in names if n.endswith(ENV_SUFFIX)}
        return ids, saved

    def exists(self, qid: str) -> bool:
        return valid_queue_id(qid) and os.path.exists(self._path(QUEUE, qid, BODY_SUFFIX))

    def load(self, qid: str) -> Envelope:
        """Read an envelope (the saved one, else the record's); an unreadable record moves to ``corrupt/``."""
        env_path = self._path(QUEUE, qid, ENV_SUFFIX)
        body_path = self._path(QUEUE, qid, BODY_SUFFIX)
        try:
            raw = _read_file(env_path)
            saved = True
        except FileNotFoundError:
            raw = None
            saved = False
        except OSError as exc:
            raise SpoolError(f"{qid}: cannot read envelope: {exc}") from exc
        if saved and not os.path.exists(body_path):
            raise QueueIdError(f"{qid}: no such message")  # removed (a removal leaves ID.env last)
        problem = ""
        if raw is None:
            try:
                raw = _read_trailer_envelope(body_path)
            except FileNotFoundError:
                raise QueueIdError(f"{qid}: no such message") from None
            except ValueError as exc:
                problem = f"unreadable record ({exc})"
            except OSError as exc:
                raise SpoolError(f"{qid}: cannot read record: {exc}") from exc
        if not problem:
            env, problem = self._check_envelope(qid, raw)
            if env is not None:
                return env
        if not os.path.exists(body_path):
            raise QueueIdError(f"{qid}: no such message")  # removed while we looked
        self._quarantine(qid, problem)
        raise SpoolError(f"{qid}: {problem}; moved to {CORRUPT}/")

    @staticmethod
    def _check_envelope(qid: str, raw: bytes) -> tuple[Envelope | None, str]:
        """(envelope, "") for a sound envelope of ``qid``, else (None, what is wrong with it)."""
        try:
            env = Envelope.from_json(raw.decode("utf-8"))
        except ValueError as exc:  # includes JSON and UTF-8 decoding errors
            return None, f"unreadable envelope ({exc})"
        if env.queue_id != qid:
            return None, f"envelope names queue id {env.queue_id!r}"
        return env, ""

    def stamp(self, qid: str) -> tuple[int, int, int, int]:
        """Identity of the current envelope version (a save renames a new ``ID.env`` in); ``OSError`` if gone."""
        try:
            st = os.stat(self._path(QUEUE, qid, ENV_SUFFIX))
            saved = 1
        except FileNotFoundError:
            st = os.stat(self._path(QUEUE, qid, BODY_SUFFIX))
            saved = 0
        return _stamp(saved, st)

    def body_path(self, qid: str) -> str:
        """``queue/ID.msg``: read its body with ``open_body_file`` (the record holds more than the body)."""
        return self._path(QUEUE, qid, BODY_SUFFIX)

    def env_path(self, qid: str) -> str:
        """``queue/ID.env``: the saved envelope, present once the envelope changed after the commit."""
        return self._path(QUEUE, qid, ENV_SUFFIX)

    def open_body(self, qid: str) -> BinaryIO:
        try:
            return open_body_file(self.body_path(qid))
        except FileNotFoundError:
            raise QueueIdError(f"{qid}: no such message") from None
        except OSError as exc:
            raise SpoolError(f"{qid}: cannot open body: {exc}") from exc

    def body_size(self, qid: str) -> int:
        try:
            return body_file_size(self.body_path(qid))
        except FileNotFoundError:
            raise QueueIdError(f"{qid}: no such message") from None
        except OSError as exc:
            raise SpoolError(f"{qid}: cannot read record: {exc}") from exc

    def free_space(self, max_age: float = 1.0) -> int:
        """Bytes available to unprivileged users on the spool's file system (re-read at most every
        ``max_age`` seconds: every MAIL asks, and a second-old answer is as good)."""
        now = time.monotonic()
        cached = self._free_cache
        if cached is not None and now - cached[0] < max_age:
            return cached[1]
        st = os.statvfs(self.directory)
        free = st.f_bavail * st.f_frsize
        self._free_cache = (now, free)
        return free

    # -- the trigger file -----------------------------------------------------------------------------

    def trigger_path(self) -> str:
        return os.path.join(self.directory, TRIGGER_FILE)

    def flush_path(self) -> str:
        return os.path.join(self.directory, FLUSH_FILE)

    def touch_flush(self) -> None:
        """Tell a running daemon that a flush asks for every flushed recipient to be really tried now."""
        try:
            fd = os.open(self.flush_path(), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                stamp = max(time.time_ns(), os.fstat(fd).st_mtime_ns + 1)
                os.utime(fd, ns=(stamp, stamp))
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("cannot touch %s: %s (refused hosts are skipped until their time is up)",
                        self.flush_path(), exc)

    def touch_trigger(self) -> None:
        """Make ``trigger`` newer, so a running daemon rescans the queue (within about a second).

        The new time is at least one nanosecond past the old one: on a coarse file-system clock two changes in
        one tick would otherwise look like one. A failure is logged, never raised: it only delays the daemon
        until its next full rescan.
        """
        path = self.trigger_path()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                stamp = max(time.time_ns(), os.fstat(fd).st_mtime_ns + 1)
                os.utime(fd, ns=(stamp, stamp))
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("cannot touch %s: %s (the daemon notices at its next full rescan)", path, exc)

    # -- locking --------------------------------------------------------------------------------------

    def lock(self, qid: str, timeout: float | None = None) -> SpoolLock:
        """Exclusive lock on one message; blocks (at most ``timeout`` seconds, then ``SpoolError``)."""
        lk = SpoolLock(self, qid)
        if timeout is not None and not lk.acquire(timeout=timeout):
            raise SpoolError(f"{qid}: message is locked (being delivered?)")
        return lk

    def try_lock(self, qid: str) -> SpoolLock | None:
        """The lock, already held, or None when someone else holds it; use it as a context manager."""
        lk = SpoolLock(self, qid)
        return lk if lk.acquire(blocking=False) else None

    # -- recovery -------------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Clean up after a crash: empty ``tmp/``, quarantine broken records, finish interrupted removals.

        Returns the ids moved to ``corrupt/``. Only at daemon start, while nothing else writes.
        """
        self._empty_tmp()
        moved = [qid for qid in self._record_ids() if self._recover_one(qid)]
        if moved:
            _fsync_dir(self._queue_dir)
        return moved

    def _empty_tmp(self) -> None:
        tmp_dir = os.path.join(self.directory, TMP)
        for name in os.listdir(tmp_dir):
            log.info("removing unfinished spool file %s", name)
            _unlink_quietly(os.path.join(tmp_dir, name))

    def _record_ids(self) -> list[str]:
        ids = set()
        for name in os.listdir(self._queue_dir):
            stem, suffix = os.path.splitext(name)
            if suffix in (ENV_SUFFIX, BODY_SUFFIX) and valid_queue_id(stem):
                ids.add(stem)
            else:
                log.warning("ignoring unexpected file %s in %s", name, self._queue_dir)
        return sorted(ids)

    def _recover_one(self, qid: str) -> bool:
        if not os.path.exists(self._path(QUEUE, qid, BODY_SUFFIX)):
            log.info("%s: finishing an interrupted removal", qid)
            _unlink_quietly(self._path(QUEUE, qid, ENV_SUFFIX))
            return False
        try:
            self.load(qid)
        except QueueIdError:
            return False
        except SpoolError:
            return not os.path.exists(self._path(QUEUE, qid, BODY_SUFFIX))  # quarantined by load
        return False

    def _quarantine(self, qid: str, reason: str) -> None:
        """Move both files of a record to ``corrupt/`` so it never stops the daemon again."""
        log.error("%s: %s; moving it to %s/", qid, reason, CORRUPT)
        for suffix in (BODY_SUFFIX, ENV_SUFFIX):  # the record first, as in remove()
            try:
                os.rename(self._path(QUEUE, qid, suffix), self._path(CORRUPT, qid, suffix))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise SpoolError(f"{qid}: cannot move to {CORRUPT}/: {exc}") from exc
        try:
            _fsync_dir(os.path.join(self.directory, CORRUPT))
            self._sync_queue_dir()
        except OSError as exc:
            log.warning("%s: cannot fsync after moving to %s/: %s", qid, CORRUPT, exc)

    def corrupt_ids(self) -> list[str]:
        names = os.listdir(os.path.join(self.directory, CORRUPT))
        return sorted({os.path.splitext(n)[0] for n in names if valid_queue_id(os.path.splitext(n)[0])})


class SpoolWriter:
    """A message being received: ``write`` streams the body into ``tmp/``, ``commit`` makes it durable.

    Use as a context manager: leaving the block without ``commit`` (an exception included) aborts.
    """

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self.size = 0
        self.queue_id, fd = self._allocate()
        self._tmp_path = spool._path(TMP, self.queue_id, BODY_SUFFIX)
        self._fd: int | None = fd
        self._buf = bytearray()
        self._committed = False
        self.stamp: tuple[int, int, int, int] | None = None  # Spool.stamp of the record, once committed

    def _allocate(self) -> tuple[str, int]:
        """A fresh id whose temp file we created with O_EXCL (so no other thread or process has it)."""
        for _ in range(_ALLOCATE_TRIES):
            qid = new_queue_id()
            path = self._spool._path(TMP, qid, BODY_SUFFIX)
            recycler = self._spool._recycler
            fd = recycler.take(path) if recycler is not None else None
            try:
                if fd is None:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise SpoolError(f"cannot create spool file: {exc}") from exc
            # The same id may have been committed already (its temp file is gone): never reuse it.
            if not os.path.exists(self._spool._path(QUEUE, qid, BODY_SUFFIX)):
                return qid, fd
            os.close(fd)
            _unlink_quietly(path)
        raise SpoolError("cannot allocate a queue id")

    def write(self, data: bytes) -> None:
        if self._fd is None:
            raise SpoolError(f"{self.queue_id}: write after commit or abort")
        self._buf += data
        self.size += len(data)
        if len(self._buf) >= _WRITE_BUFFER:
            self._drain()

    def _drain(self) -> None:
        try:
            _write_all(self._fd, self._buf)
        except OSError as exc:
            self.abort()
            raise SpoolError(f"{self.queue_id}: cannot write message: {exc}") from exc
        del self._buf[:]

    def commit(self, env: Envelope) -> None:
        """Make body and envelope durable; only after this returns may the server answer 250."""
        if env.queue_id != self.queue_id:
            raise ValueError(f"envelope queue id {env.queue_id!r} is not the writer's {self.queue_id!r}")
        if self._fd is None:
            raise SpoolError(f"{self.queue_id}: commit after commit or abort")
        spool = self._spool
        body_dst = spool._path(QUEUE, self.queue_id, BODY_SUFFIX)
        env.size = self.size  # readers (the relay's SIZE=) take the body's length from the envelope
        try:
            # The envelope rides in the same file: one inode and one fsync per message (ext4 pays dearly
            # for every inode it allocates while many were freed recently).
            self._buf += record_trailer(self.size, env)
            _write_all(self._fd, self._buf)
            del self._buf[:]
            os.fsync(self._fd)
            st = os.fstat(self._fd)
            self.stamp = _stamp(0, st)  # as Spool.stamp gives it until a save
            self._close()
            os.rename(self._tmp_path, body_dst)
            spool._sync_queue_dir()
        except OSError as exc:
            self._undo()
            raise SpoolError(f"{self.queue_id}: cannot store message: {exc}") from exc
        self._committed = True
        log.debug("%s: committed %d bytes", self.queue_id, self.size)

    def abort(self) -> None:
        """Forget the message; idempotent, and a no-op after a successful commit."""
        if self._committed:
            return
        self._undo()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _undo(self) -> None:
        try:
            self._close()
        except OSError:
            pass  # the buffered data could not be flushed: we are throwing it away anyway
        # A failed commit may have renamed the record into queue/ already.
        for path in (self._spool._path(QUEUE, self.queue_id, BODY_SUFFIX), self._tmp_path):
            _unlink_quietly(path)

    def __enter__(self):  # returns self
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._committed:
            self.abort()
