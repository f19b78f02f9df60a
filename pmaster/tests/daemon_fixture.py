"""Test helpers: a real ``pmaster run`` daemon in a subprocess, and an in-process SMTP listener.

API:
  ``free_port(host="127.0.0.1") -> int``; ``free_dual_port() -> int`` (free on 0.0.0.0 and [::] at once).
  ``render(text, **values) -> str``: replaces ``{name}`` for the given names only, so ``${RCPT_TO}`` and other
     braces in a configuration survive.
  ``DaemonProcess(tmp_path, config_text, extra_ports=0, values=None, cwd=None, env=None, config_path=None,
     preexec_fn=None, ...)``: writes ``tmp_path/pmaster.cf`` from ``config_text`` rendered
     with ``{port}`` (and ``{port1}`` ... for ``extra_ports``), ``{tmp}``, ``{spool}``, ``{hostname}`` and any
     ``values=``; ``start()`` runs ``[sys.executable, "-m", "pmaster", "run", "-c", cfg]`` with stdout and
     stderr going to ``tmp_path/daemon.log`` and waits until ``port`` accepts (an SMTP greeting, then QUIT).
     ``stop()`` (SIGTERM, SIGKILL after 10 s), ``kill9()``, ``restart()``, ``reload()`` (SIGHUP),
     ``log_text()``, ``rss_kib()``, ``queue_ids()``, ``envelope(qid)``, ``body(qid)``, ``spool_files()``,
     ``smtp()`` (a connected ``smtplib.SMTP``), ``client()`` (a ``RawClient`` past the greeting).
  ``wait_for(predicate, timeout)``: polls until true.
  ``DaemonFactory(tmp_path)``: ``factory(config_text=DEFAULT_CONFIG, **kwargs) -> DaemonProcess`` (started);
     ``stop_all()``. Fixture ``pmaster_daemon`` yields one and stops every daemon at teardown. To use the
     fixture, import it into ``conftest.py`` (``from pmaster.tests.daemon_fixture import pmaster_daemon``);
     ``pytest_plugins`` with this module triggers a PytestAssertRewriteWarning once any test module imports it.
  ``InProcessSmtpd(tmp_path, config_text)``: a context manager that loads the config, makes a ``Spool`` and a
     ``Runtime`` and serves the first ``[smtpd]`` section in a thread on an ephemeral port of 127.0.0.1
     (whatever its ``listen-port`` says); no scheduler, so messages stay in the spool. Much faster than a
     subprocess.
  ``RawClient(host, port, source=None)``: a socket client for exact transcripts (connecting from ``source``
     when given): ``send``, ``line``, ``reply`` (a whole
     possibly multi-line reply as a list of lines), ``cmd(text) -> reply``, ``recv_all(wait)``.
Invariants: every wait is bounded; ports are ephemeral (safe under pytest-xdist); nothing outside ``tmp_path``
  is written, except by a configuration that asks for it.
"""

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import pytest

from pmaster.config import load
from pmaster.smtpd import Listener, Runtime
from pmaster.spool import Spool, open_body_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# A small complete configuration: one listener, everything for example.org swallowed by a pipe.
DEFAULT_CONFIG = """\
[core]
  hostname = {hostname}
  spool-directory = {spool}
  pid-file = {tmp}/run/pmaster.pid
  retry-min = 1s
  retry-max = 2s

[smtpd test]
  name = mx.test
  listen-port = 127.0.0.1:{port}

[route]
  @example.org  pipe(cat >/dev/null)
"""

STOP_GRACE = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_dual_port() -> int:
    """A port that is free on every IPv4 and IPv6 address (for ``*:PORT`` listeners)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s6.bind(("::", 0))
            port = s6.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
                s4.bind(("0.0.0.0", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free dual-stack port")


def render(text: str, **values: object) -> str:
    for key, value in values.items():
        text = text.replace("{%s}" % key, str(value))
    return text


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something true; return it, or the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Like ``wait_for``, but a timeout fails the test, naming ``what`` was awaited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for %s" % what)


def process_dead(pid: int) -> bool:
    """Gone, or a zombie (this machine's init does not reap detached processes)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:].startswith("Z")


def smtp_probe(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when an SMTP greeting comes from host:port; the session is closed with QUIT."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            f = s.makefile("rb")
            line = f.readline()
            if not line[:3].isdigit():
                return False
            s.sendall(b"QUIT\r\n")
            f.readline()
            # EOF means the server has closed the session and released its connection slot
            f.read()
            return True
    except OSError:
        return False


class RawClient:
    """A plain socket client for exact SMTP transcripts."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, greeting: bool = True,
                 source: Optional[str] = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source is not None:  # e.g. 127.0.0.2: a loopback client outside the default trusted-networks
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""
        self.greeting = self.reply() if greeting else None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed; buffered %r" % self.buf)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self) -> List[str]:
        """One reply: every line of a multi-line reply, without CRLF."""
        lines = []
        while True:
            text = self.line().decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return lines

    def code(self) -> int:
        return int(self.reply()[-1][:3])

    def cmd(self, text: str) -> List[str]:
        self.send(text.encode("utf-8") + b"\r\n")
        return self.reply()

    def recv_all(self, wait: float = 0.3) -> bytes:
        """Everything that arrives within ``wait`` seconds of quiet (plus what is buffered)."""
        self.sock.settimeout(wait)
        data = self.buf
        self.buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
        finally:
            self.sock.settimeout(10.0)
        return data

    def closed(self, wait: float = 5.0) -> bool:
        """True when the server closes the connection within ``wait`` seconds (buffered data is dropped)."""
        self.sock.settimeout(wait)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except socket.timeout:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SpoolView:
    """What tests read of a server's spool and how they connect; needs ``spool_dir``, ``host``, ``port``."""

    spool_dir: str
    host: str
    port: int

    def queue_ids(self) -> List[str]:
        return spool_queue_ids(self.spool_dir)

    def envelope(self, qid: str) -> dict:
        return json.loads(Spool(self.spool_dir).load(qid).to_json())

    def body(self, qid: str) -> bytes:
        with open_body_file(os.path.join(self.spool_dir, "queue", qid + ".msg")) as f:
            return f.read()

    def spool_files(self, sub: str) -> List[str]:
        try:
            return sorted(os.listdir(os.path.join(self.spool_dir, sub)))
        except FileNotFoundError:
            return []

    def smtp(self, timeout: float = 10.0) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, timeout=timeout)

    def client(self, **kwargs) -> RawClient:
        return RawClient(self.host, self.port, **kwargs)


class DaemonProcess(_SpoolView):
    """A ``pmaster run`` subprocess on a temporary configuration."""

    def __init__(self, tmp_path, config_text: str = DEFAULT_CONFIG, extra_ports: int = 0,
                 values: Optional[Dict[str, object]] = None, host: str = "127.0.0.1", port: Optional[int] = None,
                 wait_port: bool = True, cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 config_path: Optional[str] = None, hostname: str = "mx.test",
                 preexec_fn: Optional[Callable[[], None]] = None):
        self.tmp = str(tmp_path)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.ports = [self.port] + [free_port(host) for _ in range(extra_ports)]
        self.spool_dir = os.path.join(self.tmp, "spool")
        self.log_path = os.path.join(self.tmp, "daemon.log")
        self.wait_port = wait_port
        self.cwd = cwd or self.tmp
        self.env = env
        self.preexec_fn = preexec_fn  # e.g. an RLIMIT_FSIZE for storage-failure tests (root ignores modes)
        self.proc: Optional[subprocess.Popen] = None
        self._log_file = None
        subs = {"port": self.port, "tmp": self.tmp, "spool": self.spool_dir, "hostname": hostname}
        subs.update(("port%d" % i, p) for i, p in enumerate(self.ports) if i)
        subs.update(values or {})
        self.config_path = config_path or os.path.join(self.tmp, "pmaster.cf")
        self.config_text = render(config_text, **subs)
        with open(self.config_path, "w") as f:
            f.write(self.config_text)

    # -- lifecycle

    def start(self, timeout: float = 15.0) -> "DaemonProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        # Pipe mailers such as the shipped "pmaster deliver" find the pmaster script of this interpreter
        # (a virtualenv's bin/ is not always on PATH when its python is run directly).
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", os.defpath)
        env.update(self.env or {})
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "pmaster", "run", "-c", self.config_path],
                                     cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, preexec_fn=self.preexec_fn)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("pmaster exited with %s:\n%s" % (self.proc.returncode, self.log_text()))
            if self.wait_port and smtp_probe(self.host, self.port, timeout=1.0):
                return
            if not self.wait_port and "pmaster started" in self.log_text():
                return
            time.sleep(0.05)
        raise RuntimeError("pmaster did not become ready in %gs:\n%s" % (timeout, self.log_text()))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = STOP_GRACE) -> Optional[int]:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close_log()
        return self.proc.returncode

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._close_log()

    def restart(self, timeout: float = 15.0) -> "DaemonProcess":
        self.stop()
        return self.start(timeout)

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- observation

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def rss_kib(self) -> int:
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")





def spool_queue_ids(spool_dir: str) -> List[str]:
    try:
        names = os.listdir(os.path.join(spool_dir, "queue"))
    except FileNotFoundError:
        return []
    return sorted(n[:-4] for n in names if n.endswith(".msg"))


class DaemonFactory:
    """Starts daemons under one tmp_path (the first in it, later ones in ``daemonN/``); ``stop_all()``."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.started: List[DaemonProcess] = []

    def __call__(self, config_text: str = DEFAULT_CONFIG, **kwargs) -> DaemonProcess:
        n = len(self.started) + 1
        base = self.tmp_path if n == 1 else self.tmp_path / ("daemon%d" % n)
        os.makedirs(str(base), exist_ok=True)
        daemon = DaemonProcess(base, config_text, **kwargs)
        self.started.append(daemon)
        return daemon.start()

    def stop_all(self) -> None:
        for daemon in self.started:
            daemon.stop()


@pytest.fixture
def pmaster_daemon(tmp_path):
    """Factory: ``pmaster_daemon(config_text, **kwargs)`` starts a daemon; all are stopped at teardown."""
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.stop_all()


class InProcessSmtpd(_SpoolView):
    """The first listener of a configuration, served in this process (no scheduler)."""

    def __init__(self, tmp_path, config_text: str = DEFAULT_CONFIG, values: Optional[Dict[str, object]] = None):
        self.tmp = str(tmp_path)
        self.spool_dir = os.path.join(self.tmp, "spool")
        # {port} renders to a valid port for the loader; the listener itself binds an ephemeral one.
        subs = {"port": free_port(), "tmp": self.tmp, "spool": self.spool_dir, "hostname": "mx.test"}
        subs.update(values or {})
        self.config_path = os.path.join(self.tmp, "pmaster.cf")
        with open(self.config_path, "w") as f:
            f.write(render(config_text, **subs))
        self.config = load(self.config_path)
        self.server = None
        self.thread: Optional[threading.Thread] = None
        self.notified: List[str] = []

    def __enter__(self) -> "InProcessSmtpd":
        self.runtime = Runtime(self.config, Spool(self.spool_dir),
                               notify=lambda qid, fresh=None: self.notified.append(qid))
        self.runtime.load_tls()
        ident = next(iter(self.config.smtpd))
        self.server = Listener(self.runtime, ident, socket.AF_INET, ("127.0.0.1", 0), "127.0.0.1:0")
        self.host, self.port = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="test-smtpd", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.runtime.accepting = False
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
