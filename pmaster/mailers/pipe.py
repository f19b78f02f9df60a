"""Pipe mailer: hand a message to a local program, the way Postfix pipe(8) does.

API:
  ``deliver(delivery, pipe, command) -> list[Result]``: exactly one of ``pipe`` (a ``[pipe]`` section: argv run
     directly, never through a shell) and ``command`` (the inline ``pipe(...)`` shell command line, run by
     ``/bin/sh -c`` with the envelope only in the environment). Every recipient of the batch gets the same
     ``Result``: one exit status serves them all.
  ``expand_argv(words, sender, recipients, queue_id) -> list[str]``: pure per-word expansion of ``${MAIL_FROM}``,
     ``${RCPT_TO}``, ``${QUEUE_ID}``, ``${RCPT_DOMAIN}`` and ``${EXTENSION}`` (reused by routing and ``pmaster route``).
  ``classify(returncode, reason) -> Result``: the sysexits reading of an exit status (SPEC 5).
Invariants: envelope data never reaches a shell's command text; the child gets a minimal environment
  (PATH=/usr/bin:/bin, HOME=/, SHELL=/bin/sh and the envelope variables) and runs in its own session, so a
  timeout kills its whole process group. The message is streamed from the spool body file (LF line ends,
  ``Return-Path:`` prepended) and never held in memory; stderr is drained concurrently, of which only the
  first 4 KiB are kept.
Threading: no helper threads: one select() loop feeds stdin, drains stderr and watches the clock, so nothing
  can stay blocked on a pipe that a grandchild keeps open. Safe to call from many worker threads at once.
  ``preexec_fn`` is never used (unsafe in a threaded daemon): running as another user goes through the tiny
  wrapper script ``pmaster/mailers/setuid.py``.
Errors: never raises for a delivery problem: a command that cannot run, a timeout or a signal is TEMPFAIL.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import BinaryIO

from pmaster import affinity, sanitize
from pmaster.config import PipeConfig
from pmaster.envelope import Recipient, split_address
from pmaster.mailers import OK, PERMFAIL, TEMPFAIL, Delivery, Result
from pmaster.spool import open_body_file

log = logging.getLogger("pmaster.pipe")

INLINE_TIMEOUT = 600  # seconds, for pipe(...) targets that have no section to configure it
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
STDERR_KEEP = 4096  # bytes of the child's stderr kept for the reason
CHUNK = 64 * 1024  # bytes read from the spool body per step: bounds memory whatever the message size
# The directory of the running Python comes first so that `pmaster deliver` (the built-in local delivery
# agent of the default configuration) is found in a virtualenv install; then Postfix's pipe(8) default.
SAFE_PATH = os.pathsep.join(dict.fromkeys([os.path.dirname(os.path.abspath(sys.executable)), "/usr/bin", "/bin"]))
POLL = 0.1  # seconds between exit checks while a grandchild may hold the pipes open

# SPEC 5, as Postfix reads sysexits.h: these mean "try again later".
TEMP_CODES = frozenset((71, 74, 75, 78, 126, 127))
# RFC 3463 codes for the permanent sysexits that say something more precise than "5.3.0".
DSN_BY_CODE = {67: "5.1.1", 68: "5.1.2", 77: "5.7.1", 69: "5.3.0", 65: "5.6.0"}
SYSEXITS = {
    64: "command line usage error", 65: "data format error", 66: "cannot open input",
    67: "user unknown", 68: "host name unknown", 69: "service unavailable",
    70: "internal software error", 71: "system error", 72: "critical OS file missing",
    73: "cannot create output file", 74: "input/output error", 75: "temporary failure",
    76: "remote error in protocol", 77: "permission denied", 78: "configuration error",
    126: "command cannot execute", 127: "command not found",
}

_VARIABLE = re.compile(r"\$\{(MAIL_FROM|RCPT_TO|QUEUE_ID|RCPT_DOMAIN|EXTENSION)\}")
_PER_RECIPIENT = ("${RCPT_TO}", "${RCPT_DOMAIN}", "${EXTENSION}")

def _address(rcpt: Recipient | str) -> str:
    return rcpt if isinstance(rcpt, str) else rcpt.address


def _extension(rcpt: Recipient | str) -> str:
    return "" if isinstance(rcpt, str) else rcpt.extension


def _recipient_value(name: str, rcpt: Recipient | str) -> str:
    if name == "RCPT_TO":
        return _address(rcpt)
    if name == "RCPT_DOMAIN":
        return split_address(_address(rcpt))[1]
    return _extension(rcpt)


def expand_argv(words: Sequence[str], sender: str, recipients: Sequence[Recipient | str],
                queue_id: str) -> list[str]:
    """Expand envelope variables in each word of a ``[pipe] exec`` line; never through a shell.

    A word that is exactly ``${RCPT_TO}``, ``${RCPT_DOMAIN}`` or ``${EXTENSION}`` becomes one word per recipient;
    inside a longer word these use the first recipient. ``recipients`` are ``Recipient`` objects or plain
    addresses (no extension). Substitution is one pass, so a value containing ``${...}`` stays literal.
    """
    argv: list[str] = []
    for word in words:
        if word in _PER_RECIPIENT:
            name = word[2:-1]
            argv.extend(_recipient_value(name, r) for r in recipients)
            continue
        argv.append(_expand_word(word, sender, recipients, queue_id))
    return argv


def _expand_word(word: str, sender: str, recipients: Sequence[Recipient | str], queue_id: str) -> str:
    first = recipients[0] if recipients else None

    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "MAIL_FROM":
            return sender
        if name == "QUEUE_ID":
            return queue_id
        return _recipient_value(name, first) if first is not None else ""

    return _VARIABLE.sub(value, word)


def envelope_environment(sender: str, recipients: Sequence[Recipient | str], queue_id: str) -> dict[str, str]:
    """The child's whole environment: minimal and safe, plus the envelope (several values space-separated)."""
    env = {
        "PATH": SAFE_PATH,
        "HOME": "/",
        "SHELL": "/bin/sh",
        "MAIL_FROM": sender,
        "RCPT_TO": " ".join(_address(r) for r in recipients),
        "QUEUE_ID": queue_id,
        "RCPT_DOMAIN": " ".join(split_address(_address(r))[1] for r in recipients),
        "EXTENSION": " ".join(_extension(r) for r in recipients),
    }
    # exec*() refuses NUL bytes; no valid envelope has them, so dropping them changes nothing real.
    return {k: v.replace("\0", "") for k, v in env.items()}


def classify(returncode: int, reason: str) -> Result:
    """Read an exit status as Postfix reads sysexits (SPEC 5); ``reason`` is the first stderr line."""
    if returncode == 0:
        return Result(OK, "exit 0" + (": " + reason if reason else ""), "2.0.0")
    if returncode < 0:
        name = _signal_name(-returncode)
        return Result(TEMPFAIL, f"killed by signal {name}" + (f": {reason}" if reason else ""), "4.3.0")
    text = f"exit {returncode}: {reason or SYSEXITS.get(returncode, 'delivery failed')}"
    if returncode in TEMP_CODES:
        return Result(TEMPFAIL, text, "4.3.0")
    return Result(PERMFAIL, text, DSN_BY_CODE.get(returncode, "5.3.0"))


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def deliver(delivery: Delivery, pipe: PipeConfig | None, command: str | None) -> list[Result]:
    """Run the mailer once for the whole batch and give every recipient its result."""
    result = _deliver_once(delivery, pipe, command)
    return [result for _ in delivery.recipients]


def _deliver_once(delivery: Delivery, pipe: PipeConfig | None, command: str | None) -> Result:
    if (pipe is None) == (command is None):
        return Result(TEMPFAIL, "pipe mailer misconfigured: need exactly one of a [pipe] section or a command",
                      "4.3.5")
    sender = delivery.envelope.sender
    env = envelope_environment(sender, delivery.recipients, delivery.queue_id)
    if pipe is not None:
        argv = expand_argv(pipe.exec, sender, delivery.recipients, delivery.queue_id)
        timeout = pipe.timeout
        name = pipe.ident
    else:
        argv = ["/bin/sh", "-c", command or ""]
        timeout = INLINE_TIMEOUT
        name = "pipe(...)"
    if not argv:
        return Result(TEMPFAIL, f"pipe {name}: empty command", "4.3.5")
    argv = [w.replace("\0", "") for w in argv]
    if pipe is not None and pipe.user:
        wrapped = _as_user(pipe.user, argv)
        if isinstance(wrapped, Result):
            return wrapped
        argv = wrapped
    end = time.monotonic() + timeout
    if delivery.deadline is not None:
        end = min(end, delivery.deadline)
    result = _run(argv, env, delivery, end, _workdir(delivery))
    log.debug("%s: pipe %s: %s", delivery.queue_id, name, sanitize.remote_text(result.reply))
    return result


def _workdir(delivery: Delivery) -> str:
    """Run in the configuration file's directory: SPEC 2 makes relative paths relative to it."""
    path = os.path.dirname(os.path.abspath(delivery.config.path))
    return path if os.path.isdir(path) else "/"


def _as_user(user: str, argv: list[str]) -> list[str] | Result:
    """Prefix ``argv`` with the setuid wrapper, or explain why that is impossible (TEMPFAIL: fix and retry)."""
    if os.geteuid() != 0:
        return Result(TEMPFAIL, f"pipe user {user}: the daemon must run as root to change user", "4.3.5")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return Result(TEMPFAIL, f"pipe user {user}: no such user", "4.3.5")
    try:
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    except OSError:
        groups = [pw.pw_gid]
    wrapper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "setuid.py")
    # -I: the wrapper runs as root until it drops privileges, so no PYTHON* variables, no user site.
    return [sys.executable, "-I", wrapper, str(pw.pw_uid), str(pw.pw_gid),
            ",".join(str(g) for g in groups), "--"] + argv


class _Feeder:
    """Streams the spool body to the child: ``Return-Path:`` first, CRLF turned into LF, one chunk at a time."""

    def __init__(self, body: BinaryIO, sender: str):
        self.body = body
        clean = re.sub(r"[\x00-\x1f\x7f]", "", sender)
        # Written with the first chunk: a small message goes to the child in one write.
        self.header = f"Return-Path: <{clean}>\n".encode("utf-8", "surrogateescape")
        self.pending = b""
        self.held_cr = b""  # a CR at a chunk's end may be the first half of a CRLF
        self.eof = False

    def next_bytes(self) -> bytes:
        """Bytes still to write (refilled from the file when empty); b'' once everything is written."""
        while not self.pending and not self.eof:  # a read of a lone CR leaves nothing to write yet
            self._refill()
        return self.pending

    def _refill(self) -> None:
        head, self.header = self.header, b""
        chunk = self.body.read(CHUNK)
        if not chunk:
            self.eof = True
            self.pending, self.held_cr = head + self.held_cr, b""
            return
        data = self.held_cr + chunk
        self.held_cr = b""
        if data.endswith(b"\r"):
            data, self.held_cr = data[:-1], b"\r"
        self.pending = head + data.replace(b"\r\n", b"\n")

    def consumed(self, n: int) -> None:
        self.pending = self.pending[n:]


class _Outcome:
    def __init__(self) -> None:
        self.stderr = b""
        self.timed_out = False
        self.read_error: str | None = None


def _run(argv: list[str], env: dict[str, str], delivery: Delivery, end: float, cwd: str) -> Result:
    try:
        with open_body_file(delivery.body_path) as body:
            return _spawn(argv, env, delivery, end, cwd, body)
    except OSError as exc:  # _spawn handles its own; this is the spool body
        return Result(TEMPFAIL, f"cannot read queued message: {exc.strerror or exc}", "4.3.0")


class _Pipes:
    """The child's stdin and stderr pipes as plain descriptors.

    Made here, not by Popen: its file objects cost six system calls per run, and every system call made
    while the thread is widened (``affinity.widened``) may move it to another CPU and back.
    """

    def __init__(self) -> None:
        self.stdin_read, self.stdin = os.pipe()
        try:
            self.stderr, self.stderr_write = os.pipe()
        except OSError:
            os.close(self.stdin_read)
            os.close(self.stdin)
            raise

    def close_child_ends(self) -> None:
        for fd in (self.stdin_read, self.stderr_write):
            _close_fd(fd)
        self.stdin_read = self.stderr_write = -1

    def close_stdin(self) -> None:
        _close_fd(self.stdin)
        self.stdin = -1

    def close_all(self) -> None:
        self.close_child_ends()
        self.close_stdin()
        _close_fd(self.stderr)
        self.stderr = -1


def _close_fd(fd: int) -> None:
    if fd < 0:
        return
    try:
        os.close(fd)
    except OSError:
        pass


_devnull_fd = [-1]
_devnull_lock = threading.Lock()


def _devnull() -> int:
    """One descriptor of /dev/null for every child's stdout, opened once."""
    with _devnull_lock:
        if _devnull_fd[0] < 0:
            _devnull_fd[0] = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        return _devnull_fd[0]


def _spawn(argv: list[str], env: dict[str, str], delivery: Delivery, end: float, cwd: str,
           body: BinaryIO) -> Result:
    try:
        devnull = _devnull()
        pipes = _Pipes()
    except OSError as exc:
        return Result(TEMPFAIL, f"cannot make pipes: {exc.strerror or exc}", "4.3.0")
    proc: subprocess.Popen[bytes] | None = None
    outcome = _Outcome()
    try:
        try:
            with affinity.widened():  # the daemon's threads share one CPU; the program may use any
                proc = subprocess.Popen(argv, stdin=pipes.stdin_read, stdout=devnull, stderr=pipes.stderr_write,
                                        env=env, cwd=cwd, close_fds=True, start_new_session=True)
        except (OSError, ValueError) as exc:
            # Popen reports a failed exec in the parent: a configuration problem, so defer (SPEC 5: 126/127).
            detail = getattr(exc, "strerror", None) or str(exc)
            return Result(TEMPFAIL, f"cannot execute {argv[0]}: {detail}", "4.3.0")
        pipes.close_child_ends()  # else no end of file on stderr when the child exits
        try:
            _supervise(proc, pipes, _Feeder(body, delivery.envelope.sender), end, outcome)
        except OSError as exc:
            return Result(TEMPFAIL, f"pipe I/O error: {exc.strerror or exc}", "4.3.0")
    finally:
        pipes.close_all()
        if proc is not None and proc.returncode is None:
            _kill_group(proc)
    if outcome.timed_out:
        return Result(TEMPFAIL, "timeout", "4.3.0")
    if outcome.read_error:
        return Result(TEMPFAIL, f"cannot read queued message: {outcome.read_error}", "4.3.0")
    return classify(proc.returncode, _first_line(outcome.stderr))


def _supervise(proc: subprocess.Popen[bytes], pipes: _Pipes, feeder: _Feeder, end: float,
               outcome: _Outcome) -> None:
    """Feed stdin, drain stderr and wait for exit in one loop; kill the group at ``end``.

    The pipes drive the loop; the child's exit is looked for when they are both done, and otherwise every
    ``POLL`` seconds (a grandchild may keep them open, even busy, after the child exited), not after
    every write.
    """
    os.set_blocking(pipes.stdin, False)
    stderr_open = True
    next_check = time.monotonic() + POLL
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            outcome.timed_out = True
            _kill_group(proc)
            return
        if pipes.stdin >= 0 and not _feed(pipes.stdin, feeder, outcome):
            if outcome.read_error:
                _kill_group(proc)  # before EOF on stdin: never let the child accept a truncated message
                return
            pipes.close_stdin()
        readers = [pipes.stderr] if stderr_open else []
        writers = [pipes.stdin] if pipes.stdin >= 0 else []
        if not readers and not writers:
            _wait_quietly(proc, min(remaining, POLL))
            if proc.returncode is not None:
                return
            continue
        ready = _ready(readers, writers, min(remaining, POLL))
        if pipes.stderr in ready and not _drain(pipes.stderr, outcome):
            stderr_open = False
        now = time.monotonic()
        if not ready or now >= next_check:
            next_check = now + POLL
            if proc.poll() is not None:
                break
    if stderr_open:
        _drain_ready(pipes.stderr, outcome)


def _ready(readers: list[int], writers: list[int], timeout: float) -> set[int]:
    """Wait until a reader has data (or EOF) or a writer has room; return the ready descriptors.

    poll(), not select(): a busy daemon may hold descriptors above FD_SETSIZE (1024).
    """
    poller = select.poll()
    for fd in readers:
        poller.register(fd, select.POLLIN)
    for fd in writers:
        poller.register(fd, select.POLLOUT)
    events = poller.poll(max(0, int(timeout * 1000)))
    return {fd for fd, _ in events}


def _feed(fd: int, feeder: _Feeder, outcome: _Outcome) -> bool:
    """Write what the pipe takes now; False when stdin is done (all written, child gone, or read error)."""
    try:
        data = feeder.next_bytes()
    except OSError as exc:
        outcome.read_error = exc.strerror or str(exc)
        return False
    if not data:
        return False
    try:
        n = os.write(fd, data)
    except BlockingIOError:
        return True
    except OSError as exc:
        # The child stopped reading (EPIPE) and may have exited: its exit status decides, not us.
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            return False
        raise
    feeder.consumed(n)
    return True


def _drain(fd: int, outcome: _Outcome) -> bool:
    """Read what stderr has; keep the first STDERR_KEEP bytes. False at EOF."""
    data = os.read(fd, 65536)
    if not data:
        return False
    room = STDERR_KEEP - len(outcome.stderr)
    if room > 0:
        outcome.stderr += data[:room]
    return True


def _drain_ready(fd: int, outcome: _Outcome) -> None:
    """After exit: take what the child wrote before it died, without waiting on a grandchild that holds stderr."""
    for _ in range(64):  # bounded: 64 reads of 64 KiB is far beyond what we keep
        if not _ready([fd], [], 0) or not _drain(fd, outcome):
            return


def _wait_quietly(proc: subprocess.Popen[bytes], seconds: float) -> None:
    try:
        proc.wait(timeout=max(seconds, 0.01))
    except subprocess.TimeoutExpired:
        pass


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, SIGKILL it after KILL_GRACE, then reap the child.

    The child is reaped only after the SIGKILL, so its pid (the group id) cannot have been reused meanwhile.
    """
    _signal_group(proc.pid, signal.SIGTERM)
    limit = time.monotonic() + KILL_GRACE
    while time.monotonic() < limit and not _exited_unreaped(proc.pid):
        time.sleep(0.05)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _exited_unreaped(pid: int) -> bool:
    """True once the child has exited, without reaping it (WNOWAIT)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _first_line(stderr: bytes) -> str:
    """The first non-empty stderr line, made safe for one log line and a DSN field."""
    text = stderr.decode("utf-8", "replace")
    for line in text.splitlines():
        line = re.sub(r"[\x00-\x1f\x7f]", " ", line).strip()
        if line:
            return line[:500]
    return ""
