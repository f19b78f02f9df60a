"""Test helpers for the web admin: a daemon with ``[webadmin]`` and a small HTTP client with a cookie jar.

API:
  ``WEB_CONFIG``: a configuration with one SMTP listener ({port}), the web admin on {port1} and a password file
    ({tmp}/passwords, user ``admin``, password ``PASSWORD``); mail to @example.org is deferred (exit 75), so it
    stays in the queue; @sent.example is delivered.
  ``write_passwords(tmp)``; ``start_web_daemon(tmp_path, config=WEB_CONFIG) -> DaemonProcess`` (started, with
    ``web_port``).
  ``Web(port, source="127.0.0.1")``: ``request(method, path, body=b"", headers=None) -> Reply`` (status,
    headers, text), ``get``, ``login(user, password)``, ``csrf()`` (the token of the session, from a page),
    ``post_form(path, fields, origin="same")``; a ``source`` other than 127.0.0.1 lets a test fail log-ins
    without slowing the others (the slowing is per client address).
  ``send(daemon, sender, rcpt, subject, body="hello")``; ``queued(web, **filters) -> [message dicts]``.
Invariants: loopback only, ephemeral ports, every wait bounded.
"""

import http.client
import json
import os
import re
import smtplib
import socket
import urllib.parse
from email.message import EmailMessage
from typing import Dict, List, Optional

from pmaster.passwords import set_password
from pmaster.tests.daemon_fixture import DaemonProcess, wait_for

PASSWORD = "correct horse battery staple"

WEB_CONFIG = """\
[core]
  hostname = {hostname}
  spool-directory = {spool}
  pid-file = {tmp}/run/pmaster.pid
  retry-min = 1h
  retry-max = 4h

[smtpd test]
  name = mx.test
  listen-port = 127.0.0.1:{port}

[webadmin]
  listen-port = 127.0.0.1:{port1}
  password-file = {tmp}/passwords

[route]
  @example.org  pipe(exit 75)
  @sent.example  pipe(cat >/dev/null)
  @xss.example  pipe(echo "<script>reply</script>" >&2; exit 75)
  @bounce.example  pipe(echo "<script>bounced</script>" >&2; exit 1)
  file "routes.inc"
"""


def write_passwords(tmp: str) -> None:
    set_password(os.path.join(tmp, "passwords"), "admin", PASSWORD)


def start_web_daemon(tmp_path, config: str = WEB_CONFIG, routes: str = "# included routes\n") -> DaemonProcess:
    tmp = str(tmp_path)
    write_passwords(tmp)
    with open(os.path.join(tmp, "routes.inc"), "w") as f:
        f.write(routes)
    daemon = DaemonProcess(tmp_path, config, extra_ports=1)
    daemon.web_port = daemon.ports[1]
    daemon.start()
    # The SMTP port is bound before the daemon starts its threads; the web admin binds after the privilege drop.
    wait_for(lambda: _accepts(daemon.web_port), 15)
    return daemon


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body
        self.text = body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.text)


class Web:
    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 20.0):
        self.port = port
        self.source = source
        self.timeout = timeout
        self.cookies: Dict[str, str] = {}
        self.origin = "http://127.0.0.1:%d" % port

    def request(self, method: str, path: str, body: bytes = b"", headers: Optional[Dict[str, str]] = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout,
                                          source_address=(self.source, 0))
        try:
            hdrs = dict(headers or {})
            if self.cookies and "Cookie" not in hdrs:
                hdrs["Cookie"] = "; ".join("%s=%s" % kv for kv in self.cookies.items())
            conn.request(method, path, body=body or None, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            for value in resp.headers.get_all("Set-Cookie") or []:
                name, _, rest = value.partition("=")
                self.cookies[name.strip()] = rest.split(";")[0]
            return Reply(resp.status, resp.headers, data)
        finally:
            conn.close()

    def get(self, path: str, headers: Optional[Dict[str, str]] = None) -> Reply:
        return self.request("GET", path, headers=headers)

    def post_form(self, path: str, fields, origin: Optional[str] = "same", headers=None) -> Reply:
        hdrs = {"Content-Type": "application/x-www-form-urlencoded"}
        if origin == "same":
            hdrs["Origin"] = self.origin
        elif origin is not None:
            hdrs["Origin"] = origin
        hdrs.update(headers or {})
        return self.request("POST", path, urllib.parse.urlencode(fields, doseq=True).encode(), hdrs)

    def login(self, user: str = "admin", password: str = PASSWORD) -> Reply:
        return self.post_form("/login", {"user": user, "password": password, "next": "/"})

    def csrf(self) -> str:
        page = self.get("/queue")
        m = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert m, "no CSRF token on the queue page (status %d)" % page.status
        return m.group(1)

    def api(self, method: str, path: str, data=None, headers=None) -> Reply:
        hdrs = {"Content-Type": "application/json", "Origin": self.origin}
        hdrs.update(headers or {})
        return self.request(method, path, json.dumps(data).encode() if data is not None else b"", hdrs)


def send(daemon: DaemonProcess, sender: str, rcpt: str, subject: str, body: str = "hello\n",
         headers: Optional[Dict[str, str]] = None) -> None:
    msg = EmailMessage()
    msg["From"] = sender or "nobody@client.test"
    msg["To"] = rcpt
    msg["Subject"] = subject
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.sendmail(sender, [rcpt], msg.as_bytes())


def queued(web: Web, **filters: str) -> List[dict]:
    reply = web.get("/api/queue?" + urllib.parse.urlencode(dict(filters, per_page="500")))
    assert reply.status == 200, reply.text
    return reply.json()["messages"]
