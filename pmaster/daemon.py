"""Composition root: bind, pid file, drop privileges, logging, threads, signals.

API: ``run(config_path, detach=False) -> int`` (``pmaster run``).
Start-up order (SPEC 7): load and validate the configuration as ``pmaster run`` judges it (machine problems
  are errors), bind every listener (so "port in use" is reported to the terminal), fork when ``--daemon``,
  write the pid file, drop to ``group-id``/``user-id``, then start the scheduler and the listener threads.
Signals: SIGTERM/SIGINT stop accepting, give sessions and deliveries 30 s in all, then mailer children are
  killed (their recipients stay deferred) and the process exits 0. SIGHUP reloads; a bad file is logged and
  the running configuration kept.
Threading: the main thread only waits for signals; each listener runs ``serve_forever`` in its own thread
  (``shutdown()`` from the thread running ``serve_forever`` would deadlock).
"""

import errno
import grp
import logging
import os
import pwd
import signal
import socket
import sys
import threading
import time
from typing import List, Optional, Set, Tuple

from pmaster import logsetup
from pmaster.config import Config, load
from pmaster.errors import ConfigError, PmasterError
from pmaster.mailers.dispatch import Mailers
from pmaster.routing import bounce_recipients
from pmaster.scheduler import Scheduler
from pmaster.smtpd import Listener, Runtime, listen_addresses
from pmaster.spool import Spool

log = logging.getLogger("pmaster.daemon")

DRAIN_SECONDS = 30.0


class Daemon:
    def __init__(self, config_path: str, detach: bool):
        self.config_path = config_path
        self.detach = detach
        self.config: Config = load(config_path, machine=True)
        self.listeners: List[Listener] = []
        self.threads: List[threading.Thread] = []
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.pid_file_written = False
        self.runtime: Optional[Runtime] = None
        self.scheduler: Optional[Scheduler] = None

    # -- start-up

    def bind(self) -> None:
        for ident, smtpd in self.config.smtpd.items():
            for family, sockaddr, label in listen_addresses(smtpd):
                self.listeners.append(Listener(self.runtime, ident, family, sockaddr, label))

    def local_addresses(self) -> Set[Tuple[str, int]]:
        out = set()
        for listener in self.listeners:
            host, port = listener.server_address[:2]
            out.add((host, port))
            if host in ("0.0.0.0", "::"):
                out.update({("127.0.0.1", port), ("::1", port)})
                for addr in _own_addresses():
                    out.add((addr, port))
        return out

    def start(self) -> None:
        config = self.config
        spool = Spool(config.core.spool_directory)
        self.runtime = Runtime(config, spool)
        self.runtime.load_tls()
        self.bind()

    def write_pid_file(self) -> None:
        path = self.config.core.pid_file
        other = _live_pid(path)
        if other is not None and other != os.getpid():
            raise PmasterError("pid file %s names the running process %d: is pmaster already running?"
                               % (path, other))
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = "%s.%d.tmp" % (path, os.getpid())
            with open(tmp, "w") as f:
                f.write("%d\n" % os.getpid())
            os.rename(tmp, path)
        except OSError as exc:
            raise PmasterError("cannot write pid file %s: %s" % (path, exc.strerror or exc))
        self.pid_file_written = True

    def drop_privileges(self) -> None:
        core = self.config.core
        if os.geteuid() != 0:
            if core.user_id or core.group_id:
                log.info("not running as root: user-id/group-id ignored")
            return
        if not core.user_id and not core.group_id:
            return
        user = pwd.getpwnam(core.user_id) if core.user_id else None
        gid = grp.getgrnam(core.group_id).gr_gid if core.group_id else (user.pw_gid if user else os.getgid())
        _chown_tree(core.spool_directory, user.pw_uid if user else -1, gid)
        try:
            os.setgroups([])
            os.setgid(gid)
            if user is not None:
                os.setuid(user.pw_uid)
        except OSError as exc:
            raise PmasterError("cannot drop privileges to %s/%s: %s" % (core.user_id, core.group_id, exc.strerror))
        if user is not None and user.pw_uid != 0:
            try:
                os.setuid(0)
            except OSError:
                pass
            else:
                raise PmasterError("privilege drop failed: could regain root")
        log.info("running as uid=%d gid=%d", os.getuid(), os.getgid())

    def launch(self) -> None:
        mailers = Mailers(self.local_addresses)
        self.scheduler = Scheduler(lambda: self.runtime.config, self.runtime.spool, mailers, bounce_recipients)
        self.runtime.notify = self.scheduler.notify
        self.scheduler.start()
        for listener in self.listeners:
            t = threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.5},
                                 name="listen:%s" % listener.ident, daemon=True)
            t.start()
            self.threads.append(t)
        log.info("pmaster started (pid %d): %s", os.getpid(),
                 ", ".join("%s on %s" % (ln.ident, ln.label) for ln in self.listeners) or "no listeners")

    # -- signals and the main loop

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda s, f: self.stop_requested.set())
        signal.signal(signal.SIGINT, lambda s, f: self.stop_requested.set())
        signal.signal(signal.SIGHUP, lambda s, f: self.reload_requested.set())
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        if hasattr(signal, "SIGXFSZ"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit must fail a write, not kill us

    def wait(self) -> None:
        while not self.stop_requested.is_set():
            self.stop_requested.wait(0.5)
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()

    def reload(self) -> None:
        try:
            config = load(self.config_path, machine=True)
            self.runtime.reload(config)
        except ConfigError as exc:
            log.error("reload failed; keeping the running configuration: %s", str(exc).replace("\n", "; "))
            return
        except PmasterError as exc:
            log.error("reload failed; keeping the running configuration: %s", exc)
            return
        self.config = config
        logsetup.configure(config, foreground=not self.detach)
        self.bind_new_listeners(config)
        self.scheduler.notify(None)
        log.info("configuration reloaded from %s", self.config_path)

    def bind_new_listeners(self, config: Config) -> None:
        bound = {(ln.ident, ln.label) for ln in self.listeners}
        for ident, smtpd in config.smtpd.items():
            try:
                addresses = listen_addresses(smtpd)
            except PmasterError as exc:
                log.error("%s", exc)
                continue
            for family, sockaddr, label in addresses:
                if (ident, label) in bound:
                    continue
                try:
                    listener = Listener(self.runtime, ident, family, sockaddr, label)
                except PmasterError as exc:
                    log.error("%s", exc)
                    continue
                self.listeners.append(listener)
                t = threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.5},
                                     name="listen:%s" % ident, daemon=True)
                t.start()
                log.info("now listening for %s on %s", ident, label)

    def shutdown(self) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
        log.info("stopping: no new connections; draining for at most %ds", DRAIN_SECONDS)
        self.runtime.accepting = False
        for listener in self.listeners:
            listener.shutdown()
            listener.server_close()
        while self.runtime.active_sessions() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.scheduler.stop(deadline)
        self.remove_pid_file()
        log.info("stopped")

    def remove_pid_file(self) -> None:
        if not self.pid_file_written:
            return
        try:
            if _read_pid(self.config.core.pid_file) == os.getpid():
                os.unlink(self.config.core.pid_file)
        except OSError:
            pass


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _live_pid(path: str) -> Optional[int]:
    pid = _read_pid(path)
    if pid is None or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return pid if exc.errno == errno.EPERM else None
    return pid


def _own_addresses() -> Set[str]:
    out = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            out.add(info[4][0])
    except OSError:
        pass
    return out


def _chown_tree(path: str, uid: int, gid: int) -> None:
    for root, dirs, files in os.walk(path):
        for name in [root] + [os.path.join(root, d) for d in dirs] + [os.path.join(root, f) for f in files]:
            try:
                os.chown(name, uid, gid)
            except OSError:
                pass


def _detach(ready_fd_holder: List[int]) -> bool:
    """Fork; returns True in the parent (which should wait for the child's word), False in the child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        ready_fd_holder.append(r)
        return True
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)  # the session leader exits: the daemon can never reacquire a terminal
    ready_fd_holder.append(w)
    return False


def _wait_for_child(fd: int) -> int:
    chunks = []
    while True:
        data = os.read(fd, 4096)
        if not data:
            break
        chunks.append(data)
    message = b"".join(chunks).decode("utf-8", "replace")
    if message.startswith("ok"):
        return 0
    sys.stderr.write(message if message.endswith("\n") else message + "\n")
    return 1


def _redirect_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def run(config_path: str, detach: bool = False) -> int:
    daemon = Daemon(config_path, detach)
    logsetup.configure(daemon.config, foreground=not detach)
    daemon.start()
    report_fd: Optional[int] = None
    if detach:
        holder: List[int] = []
        if _detach(holder):
            return _wait_for_child(holder[0])
        report_fd = holder[0]
    try:
        daemon.write_pid_file()
        daemon.drop_privileges()
        daemon.install_signals()
        daemon.launch()
    except PmasterError as exc:
        if report_fd is not None:
            os.write(report_fd, ("pmaster: %s\n" % exc).encode())
            os._exit(1)
        daemon.remove_pid_file()
        raise
    if report_fd is not None:
        os.write(report_fd, b"ok\n")
        os.close(report_fd)
        _redirect_stdio()
    daemon.wait()
    daemon.shutdown()
    return 0
