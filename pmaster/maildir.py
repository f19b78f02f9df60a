"""Built-in local delivery agent: ``pmaster deliver --maildir DIR USER...`` (SPEC section 1).

API:
  ``main(argv) -> int``: read one message on stdin and store it in the Maildir ``DIR/USER/`` of each user;
     the result is a sysexits code (0 delivered, 64 usage, 67 bad user name, 75 I/O error: try again).
  ``deliver_to_maildir(base, user, stream) -> str``: store ``stream`` for one user; returns the path in ``new/``.
  ``valid_user(name) -> str``: the mailbox name for ``name`` (the local part of ``joe@x``), or ``ValueError``.
Invariants: a message appears in ``new/`` only complete and fsynced (written in ``tmp/``, fsynced, renamed,
  directory fsynced), under a unique name ``SECONDS.M<usec>P<pid>Q<seq>.<host>``. stdin is read once: the
  message is spooled into the first user's ``tmp/`` and hard-linked (or copied) for the others, and nothing
  is renamed into any ``new/`` before every copy is on disk, so an I/O error delivers to nobody and exit 75
  lets the mailer retry without duplicates. User names never escape DIR: no ``/``, no leading ``.``, no NUL or
  newline. Maildir directories are created with mode 0700, messages 0600.
Threading: a short-lived command; no threads.
Errors: one line on stderr and a sysexits code; never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import shutil
import socket
import sys
import time
from typing import BinaryIO, NoReturn

EX_OK = 0
EX_USAGE = 64
EX_NOUSER = 67
EX_TEMPFAIL = 75

CHUNK = 64 * 1024
_sequence = itertools.count(1)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a bad command line; sysexits says 64."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def valid_user(name: str) -> str:
    """The mailbox directory name for ``name``; ``ValueError`` when it could escape DIR."""
    local = name.rsplit("@", 1)[0] if "@" in name else name
    if not local:
        raise ValueError("empty user name")
    if "/" in local or local.startswith(".") or any(c in local for c in "\0\r\n"):
        raise ValueError(f"invalid user name {local!r}")
    return local


def _unique_name() -> str:
    """Maildir unique name (as Dovecot and Courier write it); ``/`` and ``:`` in the host are escaped."""
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"
    return f"{int(now)}.M{int(now % 1 * 1000000)}P{os.getpid()}Q{next(_sequence)}.{host}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_maildir(base: str, user: str) -> str:
    """Create ``base/user/{tmp,new,cur}`` (0700) as needed; returns ``base/user``."""
    root = os.path.join(base, user)
    os.makedirs(base, exist_ok=True)  # the shared parent keeps the umask's mode, like /var/mail
    for path in (root, os.path.join(root, "tmp"), os.path.join(root, "new"), os.path.join(root, "cur")):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    return root


def _spool(stream: BinaryIO, maildir: str) -> str:
    """Copy ``stream`` into ``maildir/tmp`` and fsync it; returns the temp path."""
    path = os.path.join(maildir, "tmp", _unique_name())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        _unlink_quietly(path)
        raise
    return path


def _place(source: str, maildir: str) -> str:
    """Put a copy of ``source`` in ``maildir/tmp``: a hard link when possible, else a copy; returns it."""
    path = os.path.join(maildir, "tmp", _unique_name())
    try:
        os.link(source, path)
        return path
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    try:
        with open(source, "rb") as src:
            _copy_to(src, path)
    except BaseException:
        _unlink_quietly(path)
        raise
    return path


def _copy_to(src: BinaryIO, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)
        out.flush()
        os.fsync(out.fileno())


def _commit(tmp_path: str, maildir: str) -> str:
    """Rename ``tmp/NAME`` to ``new/NAME`` and make the rename durable."""
    final = os.path.join(maildir, "new", os.path.basename(tmp_path))
    _fsync_dir(os.path.join(maildir, "tmp"))
    os.rename(tmp_path, final)
    _fsync_dir(os.path.join(maildir, "new"))
    return final


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def deliver_to_maildir(base: str, user: str, stream: BinaryIO) -> str:
    """Store the message read from ``stream`` in ``base/user/new``; returns its path.

    ``ValueError`` for an invalid user name, ``OSError`` for an I/O problem (nothing is left in ``new/``).
    """
    maildir = ensure_maildir(base, valid_user(user))
    tmp_path = _spool(stream, maildir)
    try:
        return _commit(tmp_path, maildir)
    except BaseException:
        _unlink_quietly(tmp_path)
        raise


def deliver_to_all(base: str, users: list[str], stream: BinaryIO) -> list[str]:
    """Store one message for every user (each name once): all copies in ``tmp/`` first, then the renames."""
    names: list[str] = []
    for user in users:
        name = valid_user(user)
        if name not in names:
            names.append(name)
    maildirs = [ensure_maildir(base, name) for name in names]
    staged: list[str] = []
    try:
        staged.append(_spool(stream, maildirs[0]))
        for maildir in maildirs[1:]:
            staged.append(_place(staged[0], maildir))
    except BaseException:
        for path in staged:
            _unlink_quietly(path)
        raise
    delivered: list[str] = []
    try:
        for path, maildir in zip(staged, maildirs):
            delivered.append(_commit(path, maildir))
    except BaseException:
        for path in staged[len(delivered):]:
            _unlink_quietly(path)
        raise
    return delivered


def _fail(code: int, message: str) -> int:
    sys.stderr.write(f"pmaster deliver: {message}\n")
    return code


def main(argv: list[str]) -> int:
    parser = _Parser(prog="pmaster deliver", description="Store a message from stdin in Maildirs.")
    parser.add_argument("--maildir", required=True, metavar="DIR", help="directory holding one Maildir per user")
    parser.add_argument("users", nargs="+", metavar="USER", help="mailbox name (the local part of USER@DOMAIN)")
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(EX_USAGE, str(exc))
    for user in args.users:
        try:
            valid_user(user)
        except ValueError as exc:
            return _fail(EX_NOUSER, str(exc))
    try:
        deliver_to_all(args.maildir, args.users, sys.stdin.buffer)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(EX_TEMPFAIL, f"cannot store message{where}: {exc.strerror or exc}")
    return EX_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
