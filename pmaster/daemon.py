"""Composition root: bind, pid file, drop privileges, logging, threads, signals.

API: ``run(config_path, detach=False) -> int`` (``pmaster run``).
Start-up order (SPEC 7): load and validate the configuration as ``pmaster run`` judges it (machine problems
  are errors), bind every listener (so "port in use" is reported to the terminal), fork when ``--daemon``,
  write the pid file, drop to ``group-id``/``user-id``, then start the scheduler and the listener threads.
Signals: SIGTERM/SIGINT stop accepting, give sessions and deliveries 30 s in all, then mailer children are
  killed (their recipients stay deferred) and the process exits 0. SIGHUP reloads; a bad file is logged and
  the running configuration kept.
  A reload also binds listen addresses that are new and closes those that have gone; settings that only a
  restart can apply (spool, pid file, user, workers) are logged as such.
Pid file: written after binding and before dropping privileges, by the process that serves (the detached one
  with ``--daemon``); a pid file naming a live pmaster process refuses the start, a stale one (dead process,
  or a recycled pid that is not pmaster) is replaced; removed at exit where permissions allow.
Privileges: as root with ``user-id``/``group-id``, supplementary groups are cleared, the gid then the uid are
  set, and the start is refused if root can be regained; the spool (owner, mode 0700) and the current log
  files are handed to the new owner first.
Threading: the main thread only waits for signals; each listener runs ``serve_forever`` in its own thread
  (``shutdown()`` from the thread running ``serve_forever`` would deadlock).
Errors: every start-up failure a user can cause is a ``PmasterError`` (one line) or a ``ConfigError``
  (FILE:LINE:COL lines); with ``--daemon`` the detached child sends it to the parent, which prints it and
  exits 1. Testing aid: ``PMASTER_DRAIN_SECONDS`` shortens the 30 s shutdown drain.
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

from pmaster import affinity, logsetup, privileges
from pmaster.config import Config, load
from pmaster.errors import ConfigError, PmasterError
from pmaster.mailers import relay
from pmaster.mailers.dispatch import Mailers
from pmaster.routing import bounce_recipients
from pmaster.scheduler import Scheduler
from pmaster.smtpd import Listener, Runtime, listen_addresses
from pmaster.spool import Spool

log = logging.getLogger("pmaster.daemon")

DRAIN_SECONDS = 30.0
CHILD_GRACE_SECONDS = 2.0  # after the drain: how long killed mailer children get to be recorded as deferred
REMOVAL_SYNC_WAIT = 10.0  # at exit: how long the last removals get to reach the disk

# Changing these needs a restart: the spool, pid file and privileges are fixed at start.
_RESTART_ONLY = ("spool_directory", "pid_file", "user_id", "group_id", "workers")


def drain_seconds() -> float:
    """The shutdown drain (SPEC 7: 30 s); ``PMASTER_DRAIN_SECONDS`` shortens it for tests."""
    value = os.environ.get("PMASTER_DRAIN_SECONDS", "")
    try:
        return max(0.0, min(DRAIN_SECONDS, float(value))) if value else DRAIN_SECONDS
    except ValueError:
        return DRAIN_SECONDS


class Daemon:
    def __init__(self, config_path: str, detach: bool):
        # Absolute, so a reload after the detached daemon changed to / still finds the file.
        self.config_path = os.path.abspath(config_path)
        self.detach = detach
        self.config: Config = load(self.config_path, machine=True)
        self.listeners: List[Listener] = []
        self.threads: List[threading.Thread] = []
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.pid_file_written: Optional[str] = None  # the path written (a reload may name another one)
        self.runtime: Optional[Runtime] = None
        self.scheduler: Optional[Scheduler] = None
        self.metrics = None
        self.metrics_server = None

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
        spool = Spool(config.core.spool_directory, recycle=True, background_removals=True)
        self.runtime = Runtime(config, spool)
        self.runtime.load_tls()
        self.bind()
        self.start_metrics_listener()

    def start_metrics_listener(self) -> None:
        """Bound with the SMTP listeners, before forking and dropping privileges; served from launch()."""
        if self.config.metrics is None or not self.config.metrics.listen_port:
            return
        from pmaster.metrics import Metrics, MetricsServer

        runtime = self.runtime
        self.metrics = Metrics(sessions=lambda: dict(runtime.per_listener), spool=lambda: runtime.spool)
        self.metrics_server = MetricsServer(self.metrics, self.config.metrics.listen_port)
        runtime.metrics = self.metrics

    def write_pid_file(self) -> None:
        path = self.config.core.pid_file
        other = _live_pid(path)
        if other is not None and other != os.getpid():
            raise PmasterError("pid file %s names the running process %d: pmaster is already running"
                               % (path, other))
        stale = _read_pid(path)
        if stale is not None and stale != os.getpid():
            log.info("replacing stale pid file %s (process %d is not a running pmaster)", path, stale)
        tmp = "%s.%d.tmp" % (path, os.getpid())
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write("%d\n" % os.getpid())
            os.rename(tmp, path)  # atomic: a reader never sees an empty pid file
        except OSError as exc:
            _unlink_quietly(tmp)
            raise PmasterError("cannot write pid file %s: %s" % (path, exc.strerror or exc))
        self.pid_file_written = path

    def drop_privileges(self) -> None:
        core = self.config.core
        if os.geteuid() != 0:
            if core.user_id or core.group_id:
                log.info("not running as root: user-id/group-id ignored")
            return
        if not core.user_id and not core.group_id:
            return
        uid, gid = _resolve_ids(core.user_id, core.group_id)
        # Hand over what the daemon writes after the drop (SPEC 7): the spool, and the log files it has open.
        _chown_tree(core.spool_directory, uid, gid)
        try:
            os.chmod(core.spool_directory, 0o700)
        except OSError as exc:
            raise PmasterError("cannot secure spool directory %s: %s" % (core.spool_directory, exc.strerror))
        try:
            logsetup.hand_over(uid, gid)
        except OSError as exc:
            raise PmasterError("cannot hand the log files over to user %s: %s" % (core.user_id, exc))
        try:
            privileges.switch_to(uid, gid)
        except OSError as exc:
            raise PmasterError("cannot drop privileges to user %s group %s: %s"
                               % (core.user_id or "(unchanged)", core.group_id or "(unchanged)", exc.strerror))
        _verify_dropped(uid, gid)
        log.info("running as uid=%d gid=%d", os.getuid(), os.getgid())

    def launch(self) -> None:
        affinity.pin_daemon()  # before the threads start: they inherit it
        mailers = Mailers(self.local_addresses)
        self.scheduler = Scheduler(lambda: self.runtime.config, self.runtime.spool, mailers, bounce_recipients)
        self.runtime.notify = self.scheduler.notify
        self.scheduler.metrics = self.metrics
        self.scheduler.start()
        if self.metrics_server is not None:
            self.metrics_server.start()
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
            for diagnostic in exc.diagnostics:
                log.error("%s", diagnostic)
            log.error("reload failed: %s is invalid; keeping the running configuration", self.config_path)
            return
        except PmasterError as exc:
            log.error("reload failed: %s; keeping the running configuration", exc)
            return
        except Exception:  # a reload must never take the daemon down
            log.exception("reload failed; keeping the running configuration")
            return
        self.warn_restart_only(config)
        self.config = config
        logsetup.configure(config, foreground=not self.detach)
        self.close_gone_listeners(config)
        self.bind_new_listeners(config)
        self.scheduler.notify(None)
        log.info("configuration reloaded from %s", self.config_path)

    def warn_restart_only(self, config: Config) -> None:
        for name in _RESTART_ONLY:
            if getattr(config.core, name) != getattr(self.config.core, name):
                log.warning("reload: %s changed; it takes effect at the next restart", name.replace("_", "-"))

    def wanted_listeners(self, config: Config) -> Set[Tuple[str, str]]:
        wanted = set()
        for ident, smtpd in config.smtpd.items():
            try:
                wanted.update((ident, label) for _, _, label in listen_addresses(smtpd))
            except PmasterError:
                # Unresolvable now: keep what is bound for it rather than drop a working listener.
                wanted.update((ln.ident, ln.label) for ln in self.listeners if ln.ident == ident)
        return wanted

    def close_gone_listeners(self, config: Config) -> None:
        wanted = self.wanted_listeners(config)
        for listener in list(self.listeners):
            if (listener.ident, listener.label) in wanted:
                continue
            listener.shutdown()  # sessions already open on it go on; only new connections stop
            listener.server_close()
            self.listeners.remove(listener)
            log.info("no longer listening for %s on %s", listener.ident, listener.label)

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
        drain = drain_seconds()
        deadline = time.monotonic() + drain
        log.info("stopping: no new connections; draining for at most %gs", drain)
        self.runtime.accepting = False
        for listener in self.listeners:
            listener.shutdown()
            listener.server_close()
        self.runtime.interrupt_idle_sessions()
        while self.runtime.active_sessions() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.runtime.active_sessions():
            log.warning("stopping with %d session(s) still open", self.runtime.active_sessions())
        self.stop_scheduler(deadline)
        if not self.runtime.spool.wait_removals_synced(REMOVAL_SYNC_WAIT):
            log.error("the removals of delivered messages are not all on disk yet")
        relay.close_cached()  # QUIT the SMTP sessions kept for reuse, now that no delivery needs them
        self.runtime.resources.close()  # policy-service connections and exec: programs
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.remove_pid_file()
        log.info("stopped")
        logsetup.flush()

    def stop_scheduler(self, deadline: float) -> None:
        """Deliveries get until ``deadline``; then their children are killed, whatever the workers do."""
        stopper = threading.Thread(target=self.scheduler.stop, args=(deadline,), name="sched-stop", daemon=True)
        stopper.start()
        stopper.join(max(0.0, deadline - time.monotonic()))
        self.kill_mailer_children()
        stopper.join(CHILD_GRACE_SECONDS)

    def kill_mailer_children(self) -> None:
        """SPEC 7: mailer children still running after the drain are killed; their recipients stay deferred."""
        children = _child_pids()
        if not children:
            return
        log.warning("killing %d mailer process(es) still running after the drain", len(children))
        for pid in children:
            _kill_group_or_process(pid)
        # Give the worker threads a moment to record the deferrals before the process ends.
        end = time.monotonic() + CHILD_GRACE_SECONDS
        while self.scheduler.in_flight and time.monotonic() < end:
            time.sleep(0.05)

    def remove_pid_file(self) -> None:
        path = self.pid_file_written
        if not path:
            return
        try:
            if _read_pid(path) == os.getpid():
                os.unlink(path)
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
    """The pid in ``path`` if that process is alive and (where /proc tells) a pmaster; else None (stale)."""
    pid = _read_pid(path)
    if pid is None or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            return None
    state = _proc_state(pid)
    if state == "Z":
        return None  # exited, waiting for a parent that does not reap it
    cmdline = _proc_cmdline(pid)
    if cmdline is not None and b"pmaster" not in cmdline:
        return None  # the pid was recycled (after a crash or reboot) by an unrelated process
    return pid


def _proc_state(pid: int) -> Optional[str]:
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    rest = stat[stat.rfind(b")") + 2:]  # the command name may contain spaces and parentheses
    return rest[:1].decode("ascii", "replace") or None


def _proc_cmdline(pid: int) -> Optional[bytes]:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read()
    except OSError:
        return None


def _child_pids() -> List[int]:
    """Our live child processes (mailers), from /proc; empty where there is no /proc."""
    me = os.getpid()
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and fields[1] == str(me).encode() and fields[0] != b"Z":
            out.append(int(name))
    return out


def _kill_group_or_process(pid: int) -> None:
    # Mailer children lead their own process group (start_new_session): kill the whole group.
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
            return
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _resolve_ids(user_id: Optional[str], group_id: Optional[str]) -> Tuple[int, int]:
    """(uid or -1 to keep, gid) for ``user-id``/``group-id``; numeric ids are accepted too."""
    uid, gid = -1, os.getgid()
    if user_id:
        try:
            pw = pwd.getpwnam(user_id) if not user_id.isdigit() else pwd.getpwuid(int(user_id))
        except KeyError:
            raise PmasterError("user-id %s: no such user" % user_id)
        uid, gid = pw.pw_uid, pw.pw_gid
    if group_id:
        try:
            gid = grp.getgrnam(group_id).gr_gid if not group_id.isdigit() else int(group_id)
        except KeyError:
            raise PmasterError("group-id %s: no such group" % group_id)
    return uid, gid


def _verify_dropped(uid: int, gid: int) -> None:
    """Refuse to go on with more privilege than asked for (a silent partial drop is the dangerous case)."""
    if os.getgroups() not in ([], [gid]):
        raise PmasterError("privilege drop failed: supplementary groups remain: %s" % os.getgroups())
    if os.getgid() != gid or os.getegid() != gid:
        raise PmasterError("privilege drop failed: still gid %d/%d" % (os.getgid(), os.getegid()))
    if uid == -1 or uid == 0:
        return
    if os.getuid() != uid or os.geteuid() != uid:
        raise PmasterError("privilege drop failed: still uid %d/%d" % (os.getuid(), os.geteuid()))
    try:
        os.setuid(0)
    except OSError:
        return
    raise PmasterError("privilege drop failed: root could be regained")


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
    """Fork; returns True in the parent (which should wait for the child's word), False in the child.

    The child leaves the terminal's session, forks again (a non-leader can never reacquire a terminal),
    changes to / (so it holds no mount busy; every configured path is absolute) and sets umask 022.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        ready_fd_holder.append(r)
        _reap(pid)
        return True
    os.close(r)
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir("/")
        os.umask(0o022)
    except OSError as exc:
        os.write(w, ("pmaster: cannot detach: %s\n" % exc.strerror).encode())
        os._exit(1)
    ready_fd_holder.append(w)
    return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)  # the intermediate child exits at once: do not leave it a zombie
    except ChildProcessError:
        pass


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
    if not message.strip():
        message = "pmaster: the daemon exited during start-up (see the log)"
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
    except Exception as exc:
        daemon.remove_pid_file()
        if report_fd is None:
            raise
        # The detached child: the parent prints our reason and exits 1 (SPEC 1: one line, no traceback).
        if isinstance(exc, PmasterError):
            text = "\n".join("pmaster: %s" % line if not _is_diagnostic(line) else line
                             for line in str(exc).splitlines())
        else:
            log.exception("start-up failed")
            text = "pmaster: start-up failed: %s" % exc
        os.write(report_fd, (text + "\n").encode("utf-8", "replace"))
        os._exit(1)
    if report_fd is not None:
        # Let go of the terminal's streams before the parent exits, so a caller reading our output (an
        # init script run through a pipe) sees its end when the parent is done.
        _redirect_stdio()
        os.write(report_fd, b"ok\n")
        os.close(report_fd)
    daemon.wait()
    daemon.shutdown()
    return 0


def _is_diagnostic(line: str) -> bool:
    return ": error: " in line or ": warning: " in line
