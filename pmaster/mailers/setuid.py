"""Drop root privileges, then exec a pipe mailer's command: the ``[pipe] user`` helper.

API: run as ``python3 -I setuid.py UID GID GROUP,GROUP,... -- ARGV...`` (``pmaster.mailers.pipe`` builds this
  line). It sets the supplementary groups, the gid and the uid, checks that root cannot be regained, and
  ``execvp``s ARGV with the environment it was given.
Invariants: imports nothing from pmaster, so it runs by path in isolated mode (``-I``) whether or not the
  package is installed. Python 3.8 has no ``Popen(user=)`` and ``preexec_fn`` is unsafe in a threaded daemon:
  this separate process is why.
Errors: exits 64 (EX_USAGE) on a malformed line, 71 (EX_OSERR) when privileges cannot be dropped, and like a
  shell 127 when the command does not exist, 126 when it cannot be executed; one line on stderr each time.
"""

from __future__ import annotations

import os
import sys

EX_USAGE = 64
EX_OSERR = 71


def _fail(code: int, message: str) -> int:
    sys.stderr.write(f"pmaster setuid: {message}\n")
    return code


def drop_privileges(uid: int, gid: int, groups: list[int]) -> None:
    """Groups first: once the uid is gone, changing groups is no longer allowed."""
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    if uid == 0:
        return
    try:
        os.setuid(0)
    except OSError:
        return
    raise OSError(f"could regain root after setuid({uid})")


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[3] != "--":
        return _fail(EX_USAGE, "usage: setuid.py UID GID GROUPS -- ARGV...")
    try:
        uid, gid = int(argv[0]), int(argv[1])
        groups = [int(g) for g in argv[2].split(",") if g]
    except ValueError:
        return _fail(EX_USAGE, "bad uid, gid or group list")
    try:
        drop_privileges(uid, gid, groups)
    except OSError as exc:
        return _fail(EX_OSERR, f"cannot change to uid {uid}: {exc}")
    command = argv[4:]
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        return _fail(127, f"{command[0]}: command not found")
    except OSError as exc:
        return _fail(126, f"{command[0]}: {exc.strerror or exc}")
    return EX_OSERR  # not reached: execvp returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
