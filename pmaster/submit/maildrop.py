"""The maildrop file: one submitted message from ``pmaster sendmail``, waiting for the daemon's pickup.

API:
  ``Submission``: the envelope as the submitter gave it (``to_json``/``from_json``).
  ``MaildropWriter(directory)``: ``start(submission)``, ``write(data)``, ``finish() -> name``, ``abort()``.
  ``read_header(fd, size) -> (Submission, body_offset, body_size)``: ``ValueError`` for a file that is no
     complete maildrop file (cut short, garbage, wrong version).
  ``is_complete(st)``: whether the writer finished the file (its owner-execute bit, as in Postfix's maildrop).
Format: ``#pmaster-maildrop 1`` LF, the submission as one JSON line, the body (CRLF line ends, no dot-stuffing),
  then a fixed-length footer ``#pmaster-maildrop-end body=N`` LF with the body's length: a file cut short has no
  valid footer.
Invariants: the file is created under its final name (O_EXCL, mode 0600, unreadable to the pickup until done),
  written, fsynced, then set to mode 0740 and fsynced again: only then is it complete, and only then does the
  command exit 0. (The submitter may not open the directory, so it cannot fsync a rename there; the mode bit
  marks completion instead, as Postfix's postdrop does.) Names are a time stamp and 64 random bits: others
  cannot list the directory, and cannot guess a name.
Errors: ``OSError`` from writing (the caller maps ENOSPC and the like to "try again later" and removes the file
  with ``abort``).
"""

import json
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

MAGIC = b"#pmaster-maildrop 1\n"
_FOOTER = b"#pmaster-maildrop-end body=%016d\n"
FOOTER_LEN = len(_FOOTER % 0)
MAX_HEADER_LINE = 1 << 20
COMPLETE_MODE = 0o740
WRITING_MODE = 0o600


@dataclass
class Submission:
    sender: str  # as given: "" for the null sender, a bare login name or user@domain
    recipients: List[str]
    uid: int = -1  # what the submitter claims; the pickup trusts the file's owner instead
    full_name: str = ""  # for a From: the pickup adds (-F, else the user's GECOS name)
    body_type: str = "7BIT"  # or "8BITMIME"
    envid: str = ""  # -V
    notify: str = ""  # -N
    ret: str = ""  # -R
    extra: dict = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> "Submission":
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("submission is not a JSON object")
        try:
            sub = cls(**data)
        except TypeError as exc:
            raise ValueError("malformed submission: %s" % exc) from None
        if not isinstance(sub.sender, str) or not isinstance(sub.recipients, list) or not sub.recipients \
                or not all(isinstance(r, str) and r for r in sub.recipients):
            raise ValueError("malformed submission: sender or recipients")
        return sub


def is_complete(st: os.stat_result) -> bool:
    return bool(st.st_mode & stat.S_IXUSR)


def new_name() -> str:
    return "%013X%s" % (time.time_ns() // 1000, secrets.token_hex(8).upper())


class MaildropWriter:
    """Writes one maildrop file; see the module docstring for the order of operations."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.name = ""
        self.path = ""
        self._fd: Optional[int] = None
        self._body = 0
        self._buf = bytearray()

    def start(self, submission: Submission) -> None:
        for _ in range(10):
            self.name = new_name()
            self.path = os.path.join(self.directory, self.name)
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   WRITING_MODE)
                break
            except FileExistsError:
                continue
        else:
            raise OSError("cannot find a free maildrop file name")
        os.fchmod(self._fd, WRITING_MODE)  # whatever the umask says
        self._buf += MAGIC + submission.to_json()

    def write(self, data: bytes) -> None:
        self._body += len(data)
        self._buf += data
        if len(self._buf) >= 1 << 16:
            self._flush()

    def _flush(self) -> None:
        assert self._fd is not None
        view = memoryview(bytes(self._buf))
        self._buf = bytearray()
        while view:
            view = view[os.write(self._fd, view):]

    def finish(self) -> str:
        assert self._fd is not None
        self._buf += _FOOTER % self._body
        self._flush()
        os.fsync(self._fd)
        os.fchmod(self._fd, COMPLETE_MODE)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        return self.name

    def abort(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def read_header(fd: int, size: int) -> Tuple[Submission, int, int]:
    """(submission, body offset, body size) of the maildrop file open at ``fd`` of ``size`` octets."""
    head = os.pread(fd, min(size, len(MAGIC) + MAX_HEADER_LINE), 0)
    if not head.startswith(MAGIC):
        raise ValueError("not a maildrop file")
    end = head.find(b"\n", len(MAGIC))
    if end < 0:
        raise ValueError("cut short in its envelope line")
    submission = Submission.from_json(head[len(MAGIC):end])
    offset = end + 1
    if size < offset + FOOTER_LEN:
        raise ValueError("cut short: no end line")
    footer = os.pread(fd, FOOTER_LEN, size - FOOTER_LEN)
    body = size - FOOTER_LEN - offset
    if footer != _FOOTER % body:
        raise ValueError("cut short or garbled: the end line does not match the size (%d octets of body)" % body)
    return submission, offset, body
