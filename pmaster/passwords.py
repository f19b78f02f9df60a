"""Password files: ``user:HASH`` lines, verified through passlib, written atomically.

API:
  ``PasswordFile(path)``: loads the file (raises ``PasswordFileError``); ``verify(user, password) -> bool`` re-reads
     the file first when it changed on disk (mtime_ns, size, inode), so ``pmaster passwd`` takes effect without a
     restart; ``users()``; ``problems()`` lists the lines whose hash the installed libraries cannot verify
     (``pmaster check`` warns, ``pmaster run`` refuses to start).
  ``hash_password(password) -> str``: ``$pbkdf2-sha256$ROUNDS$SALT$HASH`` in passlib's format, standard library only.
  ``set_password(path, user, password)`` adds or replaces a user; ``delete_user(path, user) -> bool``.
  ``check_user_name(user)``: raises ``PasswordFileError`` for a name that cannot be stored.
File format: ``#`` comments and blank lines are kept as they are. A line is ``user:HASH``, or a Dovecot passwd-file
  line ``user:{SCHEME}HASH:uid:gid:...`` (the second field is the hash; the other fields are kept when the password
  is replaced; such a line gets a ``{SHA512-CRYPT}`` hash, which Dovecot reads too). Hashes: ``$pbkdf2-sha256$`` (what we write), SHA-crypt ``$6$``/``$5$``, bcrypt ``$2y$``/``$2b$``/
  ``$2a$`` (needs the ``bcrypt`` package), ``$argon2id$`` (needs ``argon2-cffi``), each optionally behind Dovecot's
  prefix (``{PBKDF2-SHA256}``, ``{SHA512-CRYPT}``, ``{SHA256-CRYPT}``, ``{BLF-CRYPT}``, ``{ARGON2ID}``), and Dovecot's
  own ``{PBKDF2}$1$SALT$ROUNDS$HEX`` (PBKDF2-HMAC-SHA1, checked with hashlib). Every other scheme (``{PLAIN}``,
  ``{CRYPT}``, MD5-crypt, ...) is a problem: it never verifies.
Invariants: a verification compares in constant time, and an unknown user costs one hash like a known one, so the
  timing does not tell which users exist. Writers replace the file by rename (temp file, fsync, rename, fsync of the
  directory) under an exclusive lock on the directory, keeping the old file's mode and owner (new files: 0600).
  Nothing here logs or stores a password.
Threading: a ``PasswordFile`` may be shared by threads; a lock guards the re-read.
Errors: ``PasswordFileError`` (a ``PmasterError``): the file cannot be read or written, or a line has no ``:``
  (the message names PATH:LINE).
"""

import base64
import errno
import fcntl
import hashlib
import hmac
import os
import re
import tempfile
import threading
from typing import Callable, Dict, List, Optional, Tuple

from pmaster.errors import PmasterError

# What we write: OWASP suggests more, but every failed SMTP AUTH costs one hash on a 2-core box; 100,000 rounds of
# PBKDF2-HMAC-SHA256 take about 60 ms in hashlib. passlib reads the rounds from the hash, so old files keep working.
ROUNDS = 100000
SALT_BYTES = 16

# Dovecot's scheme prefix -> the hash identifiers it may hold (None: Dovecot's own PBKDF2-SHA1 format).
DOVECOT_SCHEMES: Dict[str, Tuple[str, ...]] = {
    "PBKDF2-SHA256": ("$pbkdf2-sha256$",),
    "SHA512-CRYPT": ("$6$",),
    "SHA256-CRYPT": ("$5$",),
    "BLF-CRYPT": ("$2y$", "$2b$", "$2a$"),
    "ARGON2ID": ("$argon2id$",),
}
_USER_BAD = re.compile(r"[\x00-\x20:\x7f]")


class PasswordFileError(PmasterError):
    """A password file cannot be read or written, or has a line that is not ``user:HASH``."""


# -- hashing


def _ab64(data: bytes) -> str:
    """passlib's "adapted base64": standard alphabet with ``.`` for ``+``, no padding."""
    return base64.b64encode(data).decode("ascii").rstrip("=").replace("+", ".")


def _ab64_decode(text: str) -> bytes:
    text = text.replace(".", "+")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str, rounds: int = ROUNDS) -> str:
    """``$pbkdf2-sha256$ROUNDS$SALT$HASH``, readable by passlib's ``pbkdf2_sha256``."""
    salt = os.urandom(SALT_BYTES)
    key = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, rounds)
    return "$pbkdf2-sha256$%d$%s$%s" % (rounds, _ab64(salt), _ab64(key))


def _verify_pbkdf2_sha256(hashed: str, password: str) -> bool:
    # Done with hashlib so that what `pmaster passwd` writes verifies even where passlib is missing.
    parts = hashed.split("$")
    if len(parts) != 5 or not parts[2].isdigit():
        raise ValueError("malformed pbkdf2-sha256 hash")
    salt, key = _ab64_decode(parts[3]), _ab64_decode(parts[4])
    got = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, int(parts[2]), len(key))
    return hmac.compare_digest(got, key)


def _verify_dovecot_pbkdf2(hashed: str, password: str) -> bool:
    # Dovecot's {PBKDF2}: "$1$SALT$ROUNDS$HEX", PBKDF2-HMAC-SHA1 over the salt's characters, 20-byte key.
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "1" or not parts[3].isdigit():
        raise ValueError("malformed Dovecot PBKDF2 hash")
    key = bytes.fromhex(parts[4])
    got = hashlib.pbkdf2_hmac("sha1", password.encode("utf-8"), parts[2].encode("utf-8"), int(parts[3]), len(key))
    return hmac.compare_digest(got, key)


def _passlib_verifier(name: str) -> Callable[[str], Optional[Callable[[str, str], bool]]]:
    def find(hashed: str) -> Optional[Callable[[str, str], bool]]:
        try:
            from passlib import hash as passlib_hash
        except ImportError:
            raise ValueError("needs passlib, which is not installed") from None
        handler = getattr(passlib_hash, name)
        if not handler.identify(hashed):
            raise ValueError("malformed %s hash" % name)
        if hasattr(handler, "has_backend") and not handler.has_backend():
            extra = {"bcrypt": "bcrypt", "argon2": "argon2-cffi"}.get(name, name)
            raise ValueError("%s hashes need the %s package, which is not installed" % (name, extra))
        try:
            handler.from_string(hashed)  # parses salt and rounds: a malformed hash fails here, not at log-in
        except (ValueError, TypeError) as exc:
            raise ValueError("malformed %s hash: %s" % (name, exc)) from None
        return lambda h, p: bool(handler.verify(p, h))
    return find


_BY_PREFIX: Tuple[Tuple[str, Callable], ...] = (
    ("$pbkdf2-sha256$", lambda h: _verify_pbkdf2_sha256),
    ("$6$", _passlib_verifier("sha512_crypt")),
    ("$5$", _passlib_verifier("sha256_crypt")),
    ("$2y$", _passlib_verifier("bcrypt")),
    ("$2b$", _passlib_verifier("bcrypt")),
    ("$2a$", _passlib_verifier("bcrypt")),
    ("$argon2id$", _passlib_verifier("argon2")),
)


def _strip_scheme(field: str) -> Tuple[Optional[str], str]:
    if field.startswith("{") and "}" in field:
        scheme, rest = field[1:].split("}", 1)
        return scheme.upper(), rest
    return None, field


def verifier_for(field: str) -> Callable[[str, str], bool]:
    """The function ``(hash, password) -> bool`` for a stored field; ``ValueError`` says why there is none."""
    scheme, hashed = _strip_scheme(field)
    if scheme == "PBKDF2":
        if not hashed.startswith("$1$"):
            raise ValueError("malformed Dovecot PBKDF2 hash")
        return _verify_dovecot_pbkdf2
    allowed = DOVECOT_SCHEMES.get(scheme) if scheme is not None else None
    if scheme is not None and allowed is None:
        raise ValueError("password scheme {%s} is not supported" % scheme)
    for prefix, find in _BY_PREFIX:
        if hashed.startswith(prefix) and (allowed is None or prefix in allowed):
            return find(hashed)
    if scheme is not None:
        raise ValueError("{%s} does not hold a %s hash" % (scheme, " or ".join(allowed or ())))
    raise ValueError("unknown hash type (expected $pbkdf2-sha256$, $6$, $5$, $2y$/$2b$ or $argon2id$)")


# -- reading


class _Entry:
    __slots__ = ("user", "field", "verify", "problem")

    def __init__(self, user: str, field: str):
        self.user = user
        self.field = field
        self.problem: Optional[str] = None
        self.verify: Optional[Callable[[str, str], bool]] = None
        try:
            self.verify = verifier_for(field)
        except ValueError as exc:
            self.problem = str(exc)


def _split_line(line: str) -> Optional[Tuple[str, str, str]]:
    """(user, hash field, rest of the line) of a ``user:HASH[:...]`` line; None for a comment or blank line."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if ":" not in stripped:
        raise ValueError("expected user:HASH")
    user, rest = stripped.split(":", 1)
    field, sep, tail = rest.partition(":")
    if not user or not field:
        raise ValueError("expected user:HASH")
    return user, field, sep + tail


def _read_text(path: str) -> Tuple[str, os.stat_result]:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read()
    except OSError as exc:
        raise PasswordFileError("cannot read password file %s: %s" % (path, exc.strerror or exc)) from None
    try:
        return raw.decode("utf-8"), st
    except UnicodeDecodeError:
        raise PasswordFileError("%s: not UTF-8 text" % path) from None


def _parse(path: str, text: str) -> Tuple[Dict[str, _Entry], List[str]]:
    entries: Dict[str, _Entry] = {}
    problems: List[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            parts = _split_line(line)
        except ValueError as exc:
            raise PasswordFileError("%s:%d: %s" % (path, number, exc)) from None
        if parts is None:
            continue
        user, field, _ = parts
        if user in entries:
            raise PasswordFileError("%s:%d: user %r given twice" % (path, number, user))
        entry = _Entry(user, field)
        if entry.problem:
            problems.append("%s:%d: user %s: %s" % (path, number, user, entry.problem))
        entries[user] = entry
    return entries, problems


def _stat_key(st: os.stat_result) -> Tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class PasswordFile:
    """A password file, re-read when it changes on disk."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._key: Optional[Tuple[int, int, int]] = None
        self._entries: Dict[str, _Entry] = {}
        self._problems: List[str] = []
        # A real hash of our kind: an unknown user costs the same work as a wrong password.
        self._dummy = hash_password(os.urandom(12).hex())
        self._load()

    def _load(self) -> None:
        text, st = _read_text(self.path)
        self._entries, self._problems = _parse(self.path, text)
        self._key = _stat_key(st)

    def _refresh(self) -> None:
        """Re-read when the file changed; a file that became broken raises (fail closed, never the old users)."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise PasswordFileError("cannot read password file %s: %s" % (self.path, exc.strerror or exc)) from None
        with self._lock:
            if _stat_key(st) != self._key:
                self._load()

    def verify(self, user: str, password: str) -> bool:
        self._refresh()
        entry = self._entries.get(user)
        if entry is None or entry.verify is None:
            _verify_pbkdf2_sha256(self._dummy, password)
            return False
        _, hashed = _strip_scheme(entry.field)
        try:
            return entry.verify(hashed, password)
        except (ValueError, TypeError):
            return False

    def users(self) -> List[str]:
        self._refresh()
        return sorted(self._entries)

    def problems(self) -> List[str]:
        self._refresh()
        return list(self._problems)


# -- writing


def check_user_name(user: str) -> None:
    if not user or _USER_BAD.search(user) or user.startswith("#"):
        raise PasswordFileError("bad user name %r: no spaces, control characters, ':' or leading '#'" % user)


def _rewrite(path: str, change: Callable[[List[str]], Optional[List[str]]]) -> None:
    """Apply ``change`` to the file's lines and replace the file atomically, under a lock on its directory.

    ``change`` returns None to leave the file as it is.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise PasswordFileError("cannot open directory %s: %s" % (directory, exc.strerror or exc)) from None
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)  # two `pmaster passwd` at once must not lose each other's change
        try:
            text, st = _read_text(path)
        except PasswordFileError:
            if os.path.exists(path):
                raise
            text, st = "", None
        _parse(path, text)  # refuse to rewrite a file we cannot read correctly
        lines = change(text.splitlines())
        if lines is None:
            return
        _write_atomic(path, directory, dfd, "".join(line + "\n" for line in lines), st)
    finally:
        os.close(dfd)


def _write_atomic(path: str, directory: str, dfd: int, data: str, old: Optional[os.stat_result]) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=directory)
    except OSError as exc:
        raise PasswordFileError("cannot write in %s: %s" % (directory, exc.strerror or exc)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), (old.st_mode & 0o7777) if old is not None else 0o600)
            if old is not None:
                try:
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
                except PermissionError:
                    pass  # not root: the file stays ours, as any editor would leave it
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        os.fsync(dfd)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError as e2:
            if e2.errno != errno.ENOENT:
                raise
        raise PasswordFileError("cannot write password file %s: %s" % (path, exc.strerror or exc)) from None


def _dovecot_hash(password: str) -> str:
    """A hash Dovecot itself understands, for a line that is shared with Dovecot (it has no pbkdf2-sha256)."""
    try:
        from passlib.hash import sha512_crypt
    except ImportError:
        raise PasswordFileError("replacing a Dovecot {SCHEME} line needs passlib, which is not installed") from None
    return "{SHA512-CRYPT}" + sha512_crypt.hash(password)


def set_password(path: str, user: str, password: str) -> None:
    """Add ``user`` or replace their hash; creates the file (0600).

    A Dovecot line (``{SCHEME}`` prefix) gets ``{SHA512-CRYPT}``, which Dovecot reads too, and keeps its other fields.
    """
    check_user_name(user)
    if not password:
        raise PasswordFileError("empty password")
    hashed = hash_password(password)

    def change(lines: List[str]) -> List[str]:
        out, done = [], False
        for line in lines:
            parts = _split_line(line)
            if parts is not None and parts[0] == user:
                field = _dovecot_hash(password) if parts[1].startswith("{") else hashed
                out.append("%s:%s%s" % (user, field, parts[2]))
                done = True
            else:
                out.append(line)
        if not done:
            out.append("%s:%s" % (user, hashed))
        return out

    _rewrite(path, change)


def delete_user(path: str, user: str) -> bool:
    """Remove ``user``; False (and the file untouched) when there was no such user."""
    if not os.path.exists(path):
        return False
    found = []

    def change(lines: List[str]) -> Optional[List[str]]:
        out = []
        for line in lines:
            parts = _split_line(line)
            if parts is not None and parts[0] == user:
                found.append(user)
                continue
            out.append(line)
        return out if found else None

    _rewrite(path, change)
    return bool(found)
