"""The web admin's HTTP(S) server inside the daemon: URL routing, the log-in gate, security headers.

API: ``WebAdmin(daemon)`` builds everything from the daemon (its runtime, spool and configuration); ``start()``
  binds ``[webadmin] listen-port`` (after the privilege drop, SPEC 8) and serves in a thread named
  ``webadmin``; ``stop()``. ``address`` is the bound (host, port). ``App.handle(request) -> Response`` is the
  URL routing, independent of sockets.
Pages: ``/login`` (GET form, POST), ``/logout`` (POST), ``/`` dashboard, ``/queue``, ``/queue/ID``,
  ``/queue/action`` (POST; a confirmation page first unless ``confirm=yes``), ``/config`` (GET; POST validates
  or applies), ``/route``, ``/events`` (server-sent events), ``/static/*``; the JSON API under ``/api/``
  (docs/webadmin.md).
Invariants (SPEC 8): everything but ``/login`` and ``/static/`` needs a session (the API also takes HTTP Basic);
  GET never changes state; a POST needs the session's CSRF token and a same-origin ``Origin`` or ``Referer``
  (a Basic-authenticated API POST has no session: it needs ``Content-Type: application/json``, which no
  cross-site form can send, and a same-origin ``Origin`` when one is given); every response carries the
  Content-Security-Policy, ``X-Content-Type-Options``, ``Referrer-Policy`` and ``Cache-Control: no-store``.
Threading: one thread per connection, at most ``MAX_CONNECTIONS`` at once (more are answered 503 and closed),
  at most ``MAX_STREAMS`` event streams; a socket timeout bounds every read and write. A ticker thread closes
  statistics intervals. A broken client ends its own thread only; ``handle_error`` logs one line.
Errors: bad input gives a 4xx page or JSON ``{"error": ...}``, never a traceback; an unexpected exception is
  logged and answered 500.
"""

import http.server
import json
import logging
import mimetypes
import os
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from pmaster import logsetup
from pmaster.errors import PmasterError
from pmaster.metrics import parse_listen
from pmaster.web import views
from pmaster.web.api import ACTIONS, Api, ApiError
from pmaster.web.auth import Auth, Session, clear_cookie, cookie, same_origin
from pmaster.web.events import Stats, Tee, sse
from pmaster.web.logstore import LogStore
from pmaster.web.queueindex import Filter, QueueIndex

log = logging.getLogger("pmaster.webadmin")

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_CONNECTIONS = 32
MAX_STREAMS = 8
TIMEOUT = 30.0
MAX_BODY = 2 * 1024 * 1024
STREAM_EVERY = 2.0
STREAM_SECONDS = 300.0  # a stream ends after this; EventSource reconnects by itself
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-store"),
)


class Request:
    def __init__(self, method: str, target: str, headers, body: bytes, client: str, scheme: str):
        self.method = method
        parts = urllib.parse.urlsplit(target)
        self.path = urllib.parse.unquote(parts.path)
        self.query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items()}
        self.headers = headers
        self.body = body
        self.client = client
        self.scheme = scheme
        self.session: Optional[Session] = None
        self.basic_user: Optional[str] = None
        self._form: Optional[Dict[str, List[str]]] = None

    def form(self) -> Dict[str, List[str]]:
        if self._form is None:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype == "application/x-www-form-urlencoded":
                self._form = urllib.parse.parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)
            else:
                self._form = {}
        return self._form

    def field(self, name: str, default: str = "") -> str:
        values = self.form().get(name)
        return values[-1] if values else default

    def json(self) -> Dict[str, object]:
        try:
            data = json.loads(self.body.decode("utf-8") or "{}")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    def is_json(self) -> bool:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() == "application/json"


class Response:
    def __init__(self, status: int = 200, body: bytes = b"", ctype: str = "text/html; charset=utf-8",
                 headers: Optional[List[Tuple[str, str]]] = None,
                 stream: Optional[Callable[[], Iterator[bytes]]] = None):
        self.status = status
        self.body = body
        self.ctype = ctype
        self.headers = headers or []
        self.stream = stream


def html_response(text: str, status: int = 200, headers: Optional[List[Tuple[str, str]]] = None) -> Response:
    return Response(status, text.encode("utf-8"), headers=headers)


def json_response(data: object, status: int = 200) -> Response:
    return Response(status, (json.dumps(data, indent=1) + "\n").encode("utf-8"), "application/json")


def redirect(location: str, headers: Optional[List[Tuple[str, str]]] = None) -> Response:
    return Response(303, b"", headers=[("Location", location)] + (headers or []))


def _safe_next(url: str) -> str:
    """Only a path of ours after log-in: never an open redirect to another site."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/"


def _int(text: str, default: int) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


class App:
    def __init__(self, api: Api, auth: Auth, stats: Stats, streams: threading.BoundedSemaphore,
                 stopping: threading.Event):
        self.api = api
        self.auth = auth
        self.stats = stats
        self.streams = streams
        self.stopping = stopping

    # -- the gate

    def handle(self, req: Request) -> Response:
        try:
            return self._handle(req)
        except ApiError as exc:
            if req.path.startswith("/api/"):
                return json_response({"error": str(exc)}, exc.status)
            return html_response(views.error_page(exc.status, str(exc), self._csrf(req)), exc.status)

    def _csrf(self, req: Request) -> Optional[str]:
        return req.session.csrf if req.session else None

    def _handle(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD", "POST"):
            return Response(405, b"method not allowed\n", "text/plain; charset=utf-8", [("Allow", "GET, POST")])
        if req.path.startswith("/static/"):
            return self.static(req)
        if req.path == "/login":
            return self.login(req)
        req.session = self.auth.session(req.headers.get("Cookie"))
        is_api = req.path.startswith("/api/")
        if req.session is None and is_api:
            user, wait = self.auth.basic(req.headers.get("Authorization"), req.client)
            if user is None:
                headers = [("WWW-Authenticate", 'Basic realm="pmaster", charset="UTF-8"')]
                if wait:
                    headers.append(("Retry-After", str(int(wait) + 1)))
                resp = json_response({"error": "log in first (a session or HTTP Basic)"}, 401)
                resp.headers.extend(headers)
                return resp
            req.basic_user = user
        if req.session is None and req.basic_user is None:
            if req.method == "GET" and req.path != "/events":
                return redirect("/login?" + urllib.parse.urlencode({"next": req.path}))
            return Response(401, b"log in first\n", "text/plain; charset=utf-8")
        if req.method == "POST":
            refusal = self.check_post(req)
            if refusal is not None:
                return refusal
        if is_api:
            return self.api_route(req)
        return self.page_route(req)

    def check_post(self, req: Request) -> Optional[Response]:
        host = req.headers.get("Host")
        if req.session is None:  # HTTP Basic on the API
            origin = req.headers.get("Origin")
            if not req.is_json() or (origin is not None and not same_origin(req.headers, req.scheme, host)):
                return json_response({"error": "a state change needs Content-Type: application/json and no "
                                               "foreign Origin"}, 403)
            return None
        token = req.headers.get("X-CSRF-Token") or (req.field("csrf") if not req.is_json() else "")
        if not same_origin(req.headers, req.scheme, host):
            log.warning("webadmin: refused POST %s from %s: Origin/Referer is not this site", req.path, req.client)
            return self._refuse(req, "refused: the request did not come from this site (Origin/Referer)")
        if not self.auth.check_csrf(req.session, token):
            log.warning("webadmin: refused POST %s from %s: bad or missing CSRF token", req.path, req.client)
            return self._refuse(req, "refused: missing or wrong CSRF token; reload the page and try again")
        return None

    def _refuse(self, req: Request, message: str) -> Response:
        if req.path.startswith("/api/"):
            return json_response({"error": message}, 403)
        return html_response(views.error_page(403, message, self._csrf(req)), 403)

    # -- log-in

    def login(self, req: Request) -> Response:
        if req.method != "POST":
            return html_response(views.login_page(next_url=_safe_next(req.query.get("next", "/"))))
        if not same_origin(req.headers, req.scheme, req.headers.get("Host")):
            return html_response(views.error_page(403, "refused: the request did not come from this site"), 403)
        user = req.field("user")
        session, wait = self.auth.login(user, req.field("password"), req.client)
        if session is None:
            log.warning("webadmin: failed log-in for %r from %s", user[:64], req.client)
            message = "Wrong user name or password."
            if wait:
                message += " Too many failures from your address: wait %d s before the next try." % (int(wait) + 1)
            headers = [("Retry-After", str(int(wait) + 1))] if wait else []
            return html_response(views.login_page(message, user, _safe_next(req.field("next", "/"))), 403, headers)
        log.info("webadmin: %s logged in from %s", session.user, req.client)
        return redirect(_safe_next(req.field("next", "/")), [("Set-Cookie", cookie(session, req.scheme == "https"))])

    # -- pages

    def page_route(self, req: Request) -> Response:
        path = req.path
        csrf = req.session.csrf
        if path == "/logout" and req.method == "POST":
            self.auth.logout(req.session)
            return redirect("/login", [("Set-Cookie", clear_cookie(req.scheme == "https"))])
        if path == "/" and req.method != "POST":
            return html_response(views.dashboard_page(self.api.stats(), csrf))
        if path == "/events" and req.method != "POST":
            return self.events(req)
        if path == "/queue" and req.method != "POST":
            data = self.api.queue(req.query, _int(req.query.get("page", "1"), 1), _int(req.query.get("n", "50"), 50))
            return html_response(views.queue_page(data, csrf))
        if path == "/queue/action" and req.method == "POST":
            return self.queue_action(req)
        if path.startswith("/queue/") and req.method != "POST":
            return html_response(views.message_page(self.api.message(path[len("/queue/"):]), csrf))
        if path == "/config":
            return self.config_page(req)
        if path == "/route" and req.method != "POST":
            return self.route_page(req)
        raise ApiError(404 if req.method != "POST" else 405, "no such page: %s %s" % (req.method, path))

    def queue_action(self, req: Request) -> Response:
        csrf = req.session.csrf
        action = req.field("action")
        if action not in ACTIONS:
            raise ApiError(400, "unknown action %r" % action)
        scope = req.field("scope", "selection")
        flt = {k[2:]: v[-1] for k, v in req.form().items() if k.startswith("f_") and k[2:] in Filter.FIELDS}
        ids = [q for q in req.form().get("id", []) if q]
        if scope == "filter":
            ids = self.api.targets((), flt)
        elif not ids:
            raise ApiError(400, "select at least one message")
        if req.field("confirm") != "yes":
            return html_response(views.confirm_page(action, ids, scope, flt, csrf))
        result = self.api.act(action, (), flt) if scope == "filter" else self.api.act(action, ids)
        log.info("webadmin: %s: %s on %d message(s): %d done", self._who(req), action, result["count"],
                 result["done"])
        return html_response(views.result_page(result, csrf))

    def config_page(self, req: Request) -> Response:
        csrf = req.session.csrf
        files = self.api.config_files()
        if req.method != "POST":
            current = self.api.config_file(req.query.get("file"))
            return html_response(views.config_page(files, current, current["text"], current["base"], None, csrf))
        path = req.field("file") or None
        text = req.field("text").replace("\r\n", "\n")
        base = req.field("base")
        current = self.api.config_file(path)
        if req.field("do") == "apply":
            outcome = self.api.apply(path, text, base)
            log.info("webadmin: %s: apply %s: %s", self._who(req), current["path"],
                     "applied" if outcome["applied"] else outcome["error"])
            if outcome["applied"]:
                fresh = self.api.config_file(path)
                return html_response(views.config_page(files, fresh, fresh["text"], fresh["base"], outcome,
                                                       csrf, outcome))
            return html_response(views.config_page(files, current, text, base, outcome, csrf, outcome))
        check = self.api.validate(path, text)
        return html_response(views.config_page(files, current, text, base, check, csrf))

    def route_page(self, req: Request) -> Response:
        listeners = sorted(self.api.config().smtpd)
        address = req.query.get("address", "")
        listener = req.query.get("listener", "")
        result = self.api.route(address, listener or None) if address else None
        return html_response(views.route_page(listeners, address, listener, result, req.session.csrf))

    def _who(self, req: Request) -> str:
        return req.session.user if req.session else (req.basic_user or "?")

    # -- the event stream

    def events(self, req: Request) -> Response:
        if not self.streams.acquire(blocking=False):
            return Response(503, b"too many event streams\n", "text/plain; charset=utf-8", [("Retry-After", "10")])

        def stream() -> Iterator[bytes]:
            try:
                yield b"retry: 3000\n\n"
                end = time.monotonic() + STREAM_SECONDS
                while not self.stopping.is_set() and time.monotonic() < end:
                    yield sse("stats", self.api.stats())
                    self.stopping.wait(STREAM_EVERY)
            finally:
                self.streams.release()

        return Response(200, ctype="text/event-stream; charset=utf-8", stream=stream)

    # -- JSON API

    def api_route(self, req: Request) -> Response:
        path, method = req.path, req.method
        if method == "POST" and not req.is_json():
            raise ApiError(415, "the API takes Content-Type: application/json")
        if path == "/api/stats" and method != "POST":
            return json_response(self.api.stats())
        if path == "/api/queue" and method != "POST":
            return json_response(self.api.queue(req.query, _int(req.query.get("page", "1"), 1),
                                                 _int(req.query.get("per_page", "50"), 50)))
        if path == "/api/queue/action" and method == "POST":
            data = req.json()
            ids = data.get("ids") or []
            flt = data.get("filter")
            if not isinstance(ids, list) or (flt is not None and not isinstance(flt, dict)):
                raise ApiError(400, "ids must be a list and filter an object")
            if flt is None and not ids:
                raise ApiError(400, "give ids or a filter")
            result = self.api.act(str(data.get("action", "")), [str(i) for i in ids], flt)
            log.info("webadmin: %s: %s on %d message(s) (API): %d done", self._who(req), data.get("action"),
                     result["count"], result["done"])
            return json_response(result)
        if path.startswith("/api/queue/") and method != "POST":
            return json_response(self.api.message(path[len("/api/queue/"):]))
        if path == "/api/config" and method != "POST":
            if "file" in req.query:
                return json_response(self.api.config_file(req.query["file"]))
            return json_response({"files": self.api.config_files(), "main": self.api.config_path})
        if path in ("/api/config/validate", "/api/config/apply") and method == "POST":
            data = req.json()
            text = data.get("text")
            if not isinstance(text, str):
                raise ApiError(400, "text must be a string")
            fpath = data.get("file") or None
            if path.endswith("validate"):
                return json_response(self.api.validate(fpath, text))
            result = self.api.apply(fpath, text, str(data.get("base", "")))
            log.info("webadmin: %s: apply %s (API): %s", self._who(req), fpath or self.api.config_path,
                     "applied" if result["applied"] else result["error"])
            return json_response(result, 200 if result["applied"] else 409 if result.get("conflict") else 422)
        if path == "/api/route" and method != "POST":
            address = req.query.get("address", "")
            if not address:
                raise ApiError(400, "give ?address=")
            return json_response(self.api.route(address, req.query.get("listener") or None))
        raise ApiError(404, "no such API call: %s %s" % (method, path))

    # -- static assets

    def static(self, req: Request) -> Response:
        name = req.path[len("/static/"):]
        if not name or "/" in name or name.startswith("."):
            raise ApiError(404, "no such file")
        path = os.path.join(STATIC, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            raise ApiError(404, "no such file") from None
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype == "application/javascript":
            ctype += "; charset=utf-8"
        return Response(200, data, ctype)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "pmaster-webadmin"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = TIMEOUT

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
        pass  # one line per request would drown the mail log; actions log their own lines

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length = _int(self.headers.get("Content-Length", "0"), -1)
        if length < 0 or length > MAX_BODY:
            self._send(Response(413, b"request too large\n", "text/plain; charset=utf-8"), method)
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        server: "_Server" = self.server  # type: ignore[assignment]
        req = Request(method, self.path, self.headers, body, self.client_address[0], server.scheme)
        try:
            resp = server.app.handle(req)
        except Exception:
            log.exception("webadmin: %s %s failed", method, req.path)
            resp = html_response(views.error_page(500, "internal error; the daemon log has the details"), 500)
        self._send(resp, method)

    def _send(self, resp: Response, method: str) -> None:
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.ctype)
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        for name, value in resp.headers:
            self.send_header(name, value)
        if resp.stream is not None:
            self.send_header("Connection", "close")
            self.close_connection = True
            self.end_headers()
            chunks = resp.stream()
            try:
                for chunk in chunks:
                    self.wfile.write(chunk)
                    self.wfile.flush()
            except OSError:
                pass  # the dashboard was closed: the usual end of a stream
            finally:
                chunks.close()  # gives the stream's slot back now, not at garbage collection
            return
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(resp.body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, app: App, tls: Optional[ssl.SSLContext]):
        self.app = app
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            request.settimeout(TIMEOUT)
            if self.tls is not None:
                request = self.tls.wrap_socket(request, server_side=True)  # handshake here, bounded by TIMEOUT
            super().process_request_thread(request, client_address)
        except (OSError, ssl.SSLError):
            self.shutdown_request(request)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        log.warning("webadmin: a request from %s failed", client_address[0])


class _Server6(_Server):
    address_family = socket.AF_INET6


class WebAdmin:
    """Everything the daemon starts and stops: the server, the ticker, the hooks into metrics and logs."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        cfg = daemon.config.webadmin
        runtime = daemon.runtime
        self.stopping = threading.Event()
        self.index = QueueIndex(runtime.spool)
        self.stats = Stats(runtime.active_sessions, self._queue_counts)
        self.logs = LogStore()
        self.api = Api(lambda: runtime.config, runtime.spool, self.index, self.stats, self.logs,
                       daemon.config_path, daemon.reload_and_wait)
        self.auth = Auth(cfg.password_file)
        self.app = App(self.api, self.auth, self.stats, threading.BoundedSemaphore(MAX_STREAMS), self.stopping)
        host, port = parse_listen(cfg.listen_port)
        tls = None
        if cfg.tls_certificate and cfg.tls_key:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                tls.load_cert_chain(cfg.tls_certificate, cfg.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise PmasterError("[webadmin] cannot load tls-certificate/tls-key: %s" % exc)
        cls = _Server6 if ":" in host else _Server
        try:
            self.server = cls((host, port), self.app, tls)
        except OSError as exc:
            raise PmasterError("[webadmin] cannot listen on %s:%d: %s" % (host, port, exc.strerror or exc))
        self.address = self.server.server_address[:2]
        self.threads: List[threading.Thread] = []

    def start(self) -> None:
        runtime = self.daemon.runtime
        runtime.metrics = Tee(self.stats, runtime.metrics) if runtime.metrics is not None else self.stats
        scheduler = self.daemon.scheduler
        if scheduler is not None:
            scheduler.metrics = Tee(self.stats, scheduler.metrics) if scheduler.metrics is not None else self.stats
        notify = runtime.notify
        index = self.index

        def tapped_notify(qid=None, fresh=None):
            index.feed(qid, fresh)
            notify(qid, fresh)

        runtime.notify = tapped_notify
        logsetup.set_tap(self.logs.tap)
        for name, target in (("webadmin", self.server.serve_forever), ("webadmin-tick", self._tick)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)
        log.info("webadmin listening on %s://%s:%d/", self.server.scheme, *self.address[:2])

    def _queue_counts(self):
        self.index.refresh()
        return self.index.counts()

    def _tick(self) -> None:
        self.index.refresh(force=True)
        while not self.stopping.wait(1.0):
            try:
                self.stats.sample()
            except Exception:  # the statistics must never take the web admin down
                log.exception("webadmin: statistics sample failed")

    def stop(self) -> None:
        self.stopping.set()
        logsetup.set_tap(None)
        self.server.shutdown()
        self.server.server_close()
