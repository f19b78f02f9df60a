"""Root-side file handling that never follows links planted by less privileged users (issue 17 items 1, 9).

API:
  ``hand_over_spool(path, uid, gid)``: before the daemon drops root, give the spool to ``uid``/``gid``
    (``uid`` -1 keeps the owner) and set its mode to 0700. The walk goes by file descriptors
    (``O_NOFOLLOW | O_DIRECTORY`` for directories, ``O_NOFOLLOW`` for files, ``fchown`` on the open fd), stays on
    the spool's file system and changes only regular files and directories that are root's or already the
    daemon user's (the one thing the start fixes: what root made in the spool, such as the directories it has
    just created). Anything else is unexpected and refuses the start (``PmasterError``), as Postfix's
    ``postfix check`` reports queue files "not owned by" the mail owner, instead of guessing. The one
    exception is ``maildrop/`` (local submissions, writable by every local user): its files keep their
    owner and only get the daemon's group, and what is not a single-link regular file there is left alone.
  ``check_pid_directory(directory)``: refuse a pid file directory that group or others can write (sticky or
    not) or that belongs to neither root nor us.
  ``write_pid_file(path, pid)``: create a temporary file in the same directory with ``O_EXCL | O_NOFOLLOW``
    (``tempfile.mkstemp``), write, ``fsync``, ``rename`` over ``path``.
Invariants: the configured spool path itself may be a link (root wrote it into the configuration); below it
  nothing is followed. A regular file is changed only when it has one link (a hard link to a file outside the
  spool would hand that file over) and only after ``fstat`` of the opened fd shows the same inode that was
  examined, so swapping an entry between the look and the change does not help an attacker.
Threading: called at start-up, before any thread runs.
Errors: ``PmasterError`` with one line naming the first problems found and what to do.
"""

import os
import stat
import tempfile
from typing import List

from pmaster.errors import PmasterError

SUBMISSIONS = "maildrop"  # local users' files (pmaster sendmail): they keep their owner
MAX_DEPTH = 4  # the spool is two levels deep; deeper directories were not made by pmaster
MAX_REPORTED = 3
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class _Walk:
    def __init__(self, top: str, dev: int, uid: int, gid: int):
        self.top = top
        self.dev = dev
        self.uid = uid
        self.gid = gid
        self.problems: List[str] = []

    def problem(self, path: str, what: str) -> None:
        self.problems.append("%s %s" % (path, what))

    def owner_ok(self, st: os.stat_result) -> bool:
        return st.st_uid in (0, self.uid)

    def hand_over(self, fd: int, st: os.stat_result) -> None:
        if (st.st_uid, st.st_gid) != (self.uid, self.gid):
            os.fchown(fd, self.uid, self.gid)


def hand_over_spool(path: str, uid: int, gid: int) -> None:
    """Give the spool at ``path`` to ``uid``/``gid`` without following links; refuse unexpected entries."""
    uid = os.geteuid() if uid == -1 else uid
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise PmasterError("cannot open spool directory %s: %s" % (path, exc.strerror or exc))
    try:
        st = os.fstat(fd)
        walk = _Walk(path, st.st_dev, uid, gid)
        if not walk.owner_ok(st):
            walk.problem(path, "is owned by uid %d" % st.st_uid)
        else:
            _directory(walk, fd, st, path, 0)
            os.fchmod(fd, 0o700)
    except OSError as exc:
        raise PmasterError("cannot secure spool directory %s: %s" % (path, exc.strerror or exc))
    finally:
        os.close(fd)
    if walk.problems:
        shown = "; ".join(walk.problems[:MAX_REPORTED])
        more = " (and %d more)" % (len(walk.problems) - MAX_REPORTED) if len(walk.problems) > MAX_REPORTED else ""
        raise PmasterError("refusing to start: unexpected entries in spool %s: %s%s; pmaster creates only "
                           "directories and regular files owned by root or user-id there: remove them or fix "
                           "their ownership" % (path, shown, more))


def _directory(walk: _Walk, fd: int, st: os.stat_result, path: str, depth: int) -> None:
    walk.hand_over(fd, st)
    submissions = depth == 1 and os.path.basename(path) == SUBMISSIONS
    for name in os.listdir(fd):
        if submissions:
            _submission(walk, fd, name)
        else:
            _entry(walk, fd, name, os.path.join(path, name), depth)


def _submission(walk: _Walk, dir_fd: int, name: str) -> None:
    """A file in ``maildrop/``: any local user may put one there, so nothing in it refuses the start.

    It keeps its owner (the submitter, logged as ``uid=``) and gets the daemon's group so the daemon can
    read it; links, special files and files with several links are left alone (the pickup deals with them).
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_dev != walk.dev or st.st_gid == walk.gid:
        return
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and stat.S_ISREG(now.st_mode) and now.st_nlink == 1:
            os.fchown(fd, -1, walk.gid)
    finally:
        os.close(fd)


def _entry(walk: _Walk, dir_fd: int, name: str, path: str, depth: int) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return  # removed while we looked (a previous run's background work is over; nothing to hand over)
    if stat.S_ISDIR(st.st_mode):
        _subdirectory(walk, dir_fd, name, path, st, depth)
    elif stat.S_ISREG(st.st_mode):
        _regular(walk, dir_fd, name, path, st)
    else:
        walk.problem(path, "is a symbolic link" if stat.S_ISLNK(st.st_mode) else "is not a regular file")


def _checked(walk: _Walk, path: str, st: os.stat_result) -> bool:
    if st.st_dev != walk.dev:
        walk.problem(path, "is on another file system")
        return False
    if not walk.owner_ok(st):
        walk.problem(path, "is owned by uid %d" % st.st_uid)
        return False
    return True


def _subdirectory(walk: _Walk, dir_fd: int, name: str, path: str, st: os.stat_result, depth: int) -> None:
    if not _checked(walk, path, st):
        return
    if depth + 1 >= MAX_DEPTH:
        walk.problem(path, "is nested deeper than the spool's layout")
        return
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        walk.problem(path, "changed while the spool was examined")
        return
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not _checked(walk, path, now):
            walk.problem(path, "changed while the spool was examined")
            return
        _directory(walk, fd, now, path, depth + 1)
    finally:
        os.close(fd)


def _regular(walk: _Walk, dir_fd: int, name: str, path: str, st: os.stat_result) -> None:
    if not _checked(walk, path, st):
        return
    if st.st_nlink != 1:
        walk.problem(path, "has %d hard links" % st.st_nlink)
        return
    if (st.st_uid, st.st_gid) == (walk.uid, walk.gid):
        return  # already the daemon's: the usual case, no need to open it
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        walk.problem(path, "changed while the spool was examined")
        return
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode) \
                or now.st_nlink != 1:
            walk.problem(path, "changed while the spool was examined")
            return
        walk.hand_over(fd, now)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------
# Pid file


def check_pid_directory(directory: str) -> None:
    """Refuse a directory where someone else could plant or replace the pid file (issue 17 item 9)."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise PmasterError("cannot use pid file directory %s: %s" % (directory, exc.strerror or exc))
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PmasterError("refusing pid file directory %s: it is writable by %s (mode %04o); use a directory "
                           "only root (or the daemon's own user) can write, such as /run"
                           % (directory, "others" if st.st_mode & stat.S_IWOTH else "its group",
                              stat.S_IMODE(st.st_mode)))
    if st.st_uid not in (0, os.geteuid()):
        raise PmasterError("refusing pid file directory %s: it belongs to uid %d, not to root or uid %d"
                           % (directory, st.st_uid, os.geteuid()))


def write_pid_file(path: str, pid: int) -> None:
    """Write ``pid`` into ``path`` atomically through a fresh ``O_EXCL | O_NOFOLLOW`` temporary file."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o755, exist_ok=True)
        os.chmod(directory, 0o755)  # what we make must pass our own check whatever the umask
    check_pid_directory(directory)
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write("%d\n" % pid)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)  # replaces a link at ``path`` itself; never writes through it
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
