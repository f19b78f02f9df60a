"""Web admin log-in: password check, sessions, CSRF tokens, same-origin checks, slowing of failed log-ins.

API:
  ``Auth(password_file)``: ``login(user, password, client) -> (Session | None, wait_seconds)``;
    ``session(cookie_header) -> Session | None``; ``logout(session)``; ``basic(header, client) -> user | None``
    (HTTP Basic, for the JSON API); ``check_csrf(session, token) -> bool``.
  ``same_origin(headers, scheme, host) -> bool``: the ``Origin`` (or, when it is absent or ``null``,
    ``Sec-Fetch-Site: same-origin``, else the ``Referer``) names us.
  ``cookie(session, secure) -> str``, ``clear_cookie(secure) -> str``: ``Set-Cookie`` values.
Invariants (SPEC 8): the session cookie is HttpOnly and SameSite=Strict (and Secure over HTTPS); a session
  carries its own CSRF token (random, compared in constant time); sessions expire after ``IDLE`` seconds
  without use and ``MAX_AGE`` in all; at most ``MAX_SESSIONS`` live (the oldest go). Failed log-ins are
  counted per client address: after ``FREE_FAILURES`` each further one locks that client out for a time
  that doubles up to ``MAX_WAIT`` (a log-in attempted meanwhile is refused without looking at the password);
  a success clears it. Passwords are verified by ``passwords.PasswordFile`` (re-read when the file changes,
  constant time) and never logged.
Threading: one lock around the maps; password hashing runs outside it.
"""

import base64
import binascii
import hmac
import logging
import secrets
import threading
import time
import urllib.parse
from typing import Dict, Mapping, Optional, Tuple

log = logging.getLogger("pmaster.webadmin")

COOKIE = "pmaster_session"
IDLE = 30 * 60
MAX_AGE = 12 * 3600
MAX_SESSIONS = 1000
FREE_FAILURES = 3
MAX_WAIT = 60.0
MAX_CLIENTS = 10000


class Session:
    __slots__ = ("token", "user", "csrf", "created", "seen")

    def __init__(self, user: str):
        self.token = secrets.token_urlsafe(32)
        self.user = user
        self.csrf = secrets.token_urlsafe(32)
        self.created = self.seen = time.monotonic()


class _Failures:
    __slots__ = ("count", "until")

    def __init__(self) -> None:
        self.count = 0
        self.until = 0.0


class Auth:
    def __init__(self, password_file: Optional[str], clock=time.monotonic):
        self.password_file = password_file
        self.clock = clock
        self._passwords = None
        self._lock = threading.Lock()
        self._sessions: Dict[str, Session] = {}
        self._failures: Dict[str, _Failures] = {}

    def _verify(self, user: str, password: str) -> bool:
        if not self.password_file or not user:
            return False
        from pmaster.passwords import PasswordFile, PasswordFileError

        try:
            if self._passwords is None:
                self._passwords = PasswordFile(self.password_file)
            return bool(self._passwords.verify(user, password))
        except PasswordFileError as exc:  # an unreadable file refuses everyone, and says why in the log
            log.error("webadmin: %s", exc)
            return False

    # -- failed log-ins per client

    def wait_for(self, client: str) -> float:
        with self._lock:
            f = self._failures.get(client)
            return max(0.0, f.until - self.clock()) if f else 0.0

    def _failed(self, client: str) -> float:
        with self._lock:
            f = self._failures.get(client)
            if f is None:
                if len(self._failures) >= MAX_CLIENTS:
                    self._failures.pop(next(iter(self._failures)))
                f = self._failures[client] = _Failures()
            f.count += 1
            if f.count >= FREE_FAILURES:
                wait = min(MAX_WAIT, 2.0 ** (f.count - FREE_FAILURES))
                f.until = self.clock() + wait
                return wait
            return 0.0

    def _succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

    def check_password(self, user: str, password: str, client: str) -> Tuple[bool, float]:
        """(ok, seconds the client must wait first); a locked-out client is refused without a check."""
        wait = self.wait_for(client)
        if wait > 0:
            return False, wait
        if self._verify(user, password):
            self._succeeded(client)
            return True, 0.0
        return False, self._failed(client)

    # -- sessions

    def login(self, user: str, password: str, client: str) -> Tuple[Optional[Session], float]:
        ok, wait = self.check_password(user, password, client)
        if not ok:
            return None, wait
        session = Session(user)
        with self._lock:
            self._expire()
            while len(self._sessions) >= MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[session.token] = session
        return session, 0.0

    def _expire(self) -> None:
        now = self.clock()
        for token, s in list(self._sessions.items()):
            if now - s.seen > IDLE or now - s.created > MAX_AGE:
                del self._sessions[token]

    def session(self, cookie_header: Optional[str]) -> Optional[Session]:
        token = _cookie_value(cookie_header or "", COOKIE)
        if not token:
            return None
        with self._lock:
            s = self._sessions.get(token)
            if s is None:
                return None
            now = self.clock()
            if now - s.seen > IDLE or now - s.created > MAX_AGE:
                del self._sessions[token]
                return None
            s.seen = now
            return s

    def logout(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.token, None)

    def basic(self, header: Optional[str], client: str) -> Tuple[Optional[str], float]:
        """(user, 0) for good ``Authorization: Basic`` credentials; (None, wait) otherwise."""
        if not header or not header[:6].lower() == "basic ":
            return None, 0.0
        try:
            raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None, 0.0
        user, sep, password = raw.partition(":")
        if not sep:
            return None, 0.0
        ok, wait = self.check_password(user, password, client)
        return (user if ok else None), wait

    @staticmethod
    def check_csrf(session: Session, token: Optional[str]) -> bool:
        return bool(token) and hmac.compare_digest(session.csrf.encode(), str(token).encode("utf-8", "replace"))


def _cookie_value(header: str, name: str) -> Optional[str]:
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip()
    return None


def cookie(session: Session, secure: bool) -> str:
    return "%s=%s; Path=/; HttpOnly; SameSite=Strict%s" % (COOKIE, session.token, "; Secure" if secure else "")


def clear_cookie(secure: bool) -> str:
    return "%s=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict%s" % (COOKIE, "; Secure" if secure else "")


def same_origin(headers: Mapping[str, str], scheme: str, host: Optional[str]) -> bool:
    """SPEC 8: a state change needs an ``Origin`` naming us, or without one a ``Referer`` on us."""
    if not host:
        return False
    ours = "%s://%s" % (scheme, host.lower())
    origin = headers.get("Origin")
    if origin is not None and origin.strip() != "null":
        return origin.strip().lower() == ours
    # Under our Referrer-Policy: no-referrer, browsers send "Origin: null" and no Referer on a form POST
    # (Fetch, "serializing a request origin"); their Sec-Fetch-Site, which no page can forge, says where it came from.
    fetch_site = headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site.strip().lower() == "same-origin"
    if origin is not None:
        return False  # "null" from a client that sends no Sec-Fetch-Site: sandboxed frames, file: pages
    referer = headers.get("Referer")
    if not referer:
        return False
    parts = urllib.parse.urlsplit(referer.strip())
    return "%s://%s" % (parts.scheme.lower(), parts.netloc.lower()) == ours
