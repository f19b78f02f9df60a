"""Typed, read-only configuration model built from the grammar's output.

API:
  ``load(path, machine=False) -> Config``: parse and validate; raises ``ConfigError`` with every error.
     Warnings are kept in ``Config.diagnostics``. With ``machine=True`` (``pmaster run``), problems that
     depend on the machine (missing include file, unknown user, unresolvable host) are errors, else warnings.
  ``check(path) -> List[Diagnostic]``: every error and warning, for ``pmaster check``.
  ``load_with_diagnostics(path, machine, texts=None)``: the config or None, and every diagnostic; ``texts``
     judges edited file contents instead of the files (the web admin); ``config_files(path)`` lists the
     file and its includes.
  The model classes below; every default of SPEC section 2 lives here.
Invariants: a ``Config`` is never mutated after ``load`` returns; SIGHUP swaps the whole object.
"""

import dataclasses
import difflib
import grp
import ipaddress
import os
import pwd
import re
import shlex
import shutil
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from pmaster.errors import ConfigError, Diagnostic, PmasterError
from pmaster.grammar import cf

DEFAULT_CONFIG = "/etc/postmaster.cf"


@dataclass(frozen=True)
class Position:
    file: str
    line: int
    col: int


@dataclass(frozen=True)
class TargetExpr:
    """One target of a routing entry, as written.

    kind: "relay" (``relay(...)``; ``args`` the hosts, empty for MX), "pipe" (``pipe(...)``; ``args`` one
    element: the shell command line), or "word" (an address, ``@domain``, or a bare word; ``args`` one element).
    ``text`` is the literal source text, e.g. ``relay(10.0.0.1:587)``.
    """

    kind: str
    args: Tuple[str, ...]
    text: str
    pos: Position


@dataclass(frozen=True)
class RouteEntry:
    key: str  # lower-cased lookup key: "local@domain", "local@", "@domain", "@", or a bare name
    targets: Tuple[TargetExpr, ...]
    pos: Position


@dataclass(frozen=True)
class RouteTable:
    ident: Optional[str]  # None for the unnamed [route]
    entries: Dict[str, RouteEntry]
    pos: Optional[Position] = None


@dataclass(frozen=True)
class CoreConfig:
    logger: Optional[str] = None  # None: stderr in the foreground, syslog with --daemon
    user_id: Optional[str] = None
    group_id: Optional[str] = None
    pid_file: str = "/var/run/postmaster.pid"
    spool_directory: str = "/var/spool/postmaster"
    local_mailer: str = "procmail"
    hostname: str = "localhost"
    workers: int = 8
    retry_min: int = 300
    retry_max: int = 4 * 3600
    queue_lifetime: int = 5 * 86400
    dns_server: Optional[Tuple[str, int]] = None
    recipient_delimiter: str = ""
    local_domains: Optional[Tuple[str, ...]] = None  # None: hostname, localhost and every [smtpd] name
    min_free_space: int = 100 * 1024 * 1024
    destination_concurrency: int = 10
    # SPEC 2: exempt from max-connections-per-ip and dnsbl; never a relaying decision (routing alone decides).
    trusted_networks: Tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    # Security: an open relay (a catch-all '@' reachable beyond loopback) is refused unless this says yes.
    allow_open_relay: bool = False

    def is_trusted(self, address: str) -> bool:
        """Whether a client address lies in ``trusted-networks`` (an IPv4-mapped IPv6 address counts as IPv4)."""
        return address_in(address, self.trusted_networks)


@dataclass(frozen=True)
class SyslogConfig:
    ident: str = "postmaster"
    facility: str = "mail"


@dataclass(frozen=True)
class LogfileConfig:
    ident: str
    file: str  # absolute path pattern with strftime placeholders


@dataclass(frozen=True)
class SmtpdConfig:
    ident: str
    name: str
    listen_ports: Tuple[str, ...]  # as written; resolved at bind time
    routing_table: Optional[str] = None
    logger: Optional[str] = None
    local_rcpt_to: bool = False
    tls_certificate: Optional[str] = None
    tls_key: Optional[str] = None
    require_tls: bool = False
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_connections: int = 200
    max_connections_per_ip: int = 20
    timeout: int = 300
    spf: str = "off"
    policies: Tuple[str, ...] = ()
    policy_service: Optional[str] = None
    policy_service_timeout: int = 10  # SPEC 2 (Postfix waits 100 s; a session should not hang that long)
    proxy_protocol: bool = False
    bare_newline: str = "normalize"
    dnsbl: Tuple[str, ...] = ()  # DNS blocklist zones, in order (SPEC 6)
    pos: Optional[Position] = None

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_certificate and self.tls_key)


@dataclass(frozen=True)
class PipeConfig:
    ident: str
    exec: Tuple[str, ...]
    max_rcpt_to: int = 1
    user: Optional[str] = None
    timeout: int = 600
    pos: Optional[Position] = None


@dataclass(frozen=True)
class RelayConfig:
    ident: str
    name: str
    addresses: Tuple[str, ...] = ()  # HOST[:PORT]; empty: use name
    port: int = 25
    tls: str = "opportunistic"  # or "required", "none"
    tls_ca_file: Optional[str] = None
    auth_user: Optional[str] = None
    auth_password_file: Optional[str] = None
    helo_name: Optional[str] = None
    verify_recipients: bool = False
    pos: Optional[Position] = None


@dataclass(frozen=True)
class MetricsConfig:
    listen_port: Optional[str] = None


@dataclass(frozen=True)
class WebadminConfig:
    listen_port: str = "127.0.0.1:8025"
    password_file: Optional[str] = None
    tls_certificate: Optional[str] = None
    tls_key: Optional[str] = None


@dataclass(frozen=True)
class Config:
    path: str
    core: CoreConfig = field(default_factory=CoreConfig)
    syslog: SyslogConfig = field(default_factory=SyslogConfig)
    logfiles: Dict[str, LogfileConfig] = field(default_factory=dict)
    smtpd: Dict[str, SmtpdConfig] = field(default_factory=dict)
    pipes: Dict[str, PipeConfig] = field(default_factory=dict)
    relays: Dict[str, RelayConfig] = field(default_factory=dict)
    routes: Dict[Optional[str], RouteTable] = field(default_factory=dict)
    metrics: Optional[MetricsConfig] = None
    webadmin: Optional[WebadminConfig] = None
    diagnostics: Tuple[Diagnostic, ...] = ()

    def local_domains(self) -> Tuple[str, ...]:
        if self.core.local_domains is not None:
            return self.core.local_domains
        names = [self.core.hostname, "localhost"] + [s.name for s in self.smtpd.values()]
        out: List[str] = []
        for n in names:
            n = n.lower().rstrip(".")
            if n and n not in out:
                out.append(n)
        return tuple(out)


# ----------------------------------------------------------------------------------------------------
# Loading: grammar items -> typed model.


KINDS = ("core", "syslog", "logfile", "smtpd", "pipe", "relay", "route", "metrics", "webadmin")
SINGLETON_KINDS = ("core", "syslog", "metrics", "webadmin")
NAMED_KINDS = ("logfile", "smtpd", "pipe", "relay")
BUILTIN_LOGGERS = ("syslog", "stderr")
FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
              "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7")
PIPE_VARIABLES = ("MAIL_FROM", "RCPT_TO", "QUEUE_ID", "RCPT_DOMAIN", "EXTENSION")
# Service names that must work on machines without the services database (no netbase on CI).
KNOWN_SERVICES = {"smtp": 25, "submission": 587, "submissions": 465, "smtps": 465, "http": 80, "https": 443}
DEFAULT_PROCMAIL = ("/usr/bin/procmail", "-f", "${MAIL_FROM}", "-d", "${RCPT_TO}")
MAX_INCLUDE_DEPTH = 20


class _Key:
    """How one key converts: ``conv(ctx, values) -> python value``; ``repeat`` appends across lines."""

    def __init__(self, conv: Callable, repeat: bool = False, supported: bool = True, default: Any = None):
        self.conv = conv
        self.repeat = repeat
        self.supported = supported
        self.default = default


class _Ctx:
    def __init__(self, loader: "_Loader", stmt: cf.Statement, basedir: str, file: str = ""):
        self.loader = loader
        self.stmt = stmt
        self.basedir = basedir
        self.file = file  # the file the statement is in (for diagnostics a converter adds itself)

    def fail(self, value: cf.Value, message: str) -> None:
        raise _ValueError(value, message)


class _ValueError(Exception):
    def __init__(self, value: cf.Value, message: str):
        self.value = value
        self.message = message


def _one(ctx: _Ctx, values) -> cf.Value:
    if len(values) != 1:
        ctx.fail(values[1] if len(values) > 1 else ctx.stmt.key,
                 "'%s' takes one value (quote it if it contains spaces)" % ctx.stmt.key.text)
    v = values[0]
    if v.kind == "call":
        ctx.fail(v, "expected a plain value, not %s" % v.text.split("(")[0] + "(...)")
    return v


def _str(ctx, values) -> str:
    v = _one(ctx, values)
    if not v.text:
        ctx.fail(v, "expected a non-empty value")
    return v.text


def _ident(ctx, values) -> str:
    return _str(ctx, values)


def _path(ctx, values) -> str:
    return os.path.normpath(os.path.join(ctx.basedir, _str(ctx, values)))


def _int_min(minimum: int) -> Callable:
    def conv(ctx, values) -> int:
        v = _one(ctx, values)
        if not re.fullmatch(r"\d+", v.text):
            ctx.fail(v, "expected a whole number, got %r" % v.text)
        n = int(v.text)
        if n < minimum:
            ctx.fail(v, "expected a number of at least %d" % minimum)
        return n
    return conv


_DURATION = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = {"": 1, "k": 1024, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}


def _scaled(units: Dict[str, int], what: str) -> Callable:
    """A number with an optional unit suffix (durations: s m h d; sizes: k M G as powers of 1024)."""
    pattern = re.compile(r"(\d+)([%s]?)" % "".join(u for u in units if u))

    def conv(ctx, values) -> int:
        v = _one(ctx, values)
        m = pattern.fullmatch(v.text)
        if not m:
            ctx.fail(v, "expected %s, got %r" % (what, v.text))
        return int(m.group(1)) * units[m.group(2)]
    return conv


_duration = _scaled(_DURATION, "a duration such as 300, 5m, 4h or 5d")
_size = _scaled(_SIZE, "a size such as 10M, 512k or 1G")


_BOOL = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}


def _bool(ctx, values) -> bool:
    v = _one(ctx, values)
    if v.text.lower() not in _BOOL:
        ctx.fail(v, "expected yes or no, got %r" % v.text)
    return _BOOL[v.text.lower()]


def _enum(*choices: str) -> Callable:
    def conv(ctx, values) -> str:
        v = _one(ctx, values)
        if v.text.lower() not in choices:
            ctx.fail(v, "expected one of %s, got %r" % (", ".join(choices), v.text))
        return v.text.lower()
    return conv


def _words(ctx, values) -> Tuple[str, ...]:
    out = []
    for v in values:
        if v.kind == "call":
            ctx.fail(v, "expected a plain value, not %s(...)" % v.text.split("(")[0])
        out.append(v.text)
    return tuple(out)


def _domains(ctx, values) -> Tuple[str, ...]:
    return tuple(w.lower().rstrip(".") for w in _words(ctx, values))


def _hostport(ctx, values) -> str:
    v = _one(ctx, values)
    hp = split_hostport(v.text)
    if hp is None or (hp[1] is not None and hp[1].isdigit() and service_port(hp[1]) is None):
        ctx.fail(v, "expected HOST, HOST:PORT or [IPV6]:PORT, got %r" % v.text)
    return v.text


def _port(ctx, values) -> int:
    v = _one(ctx, values)
    if not re.fullmatch(r"[0-9]+", v.text) or service_port(v.text) is None:
        ctx.fail(v, "expected a port number from 1 to 65535, got %r" % v.text)
    return int(v.text)


def _listen(ctx, values) -> Tuple[str, ...]:
    out = []
    for v in values:
        if v.kind == "call" or parse_listen(v.text, "x") is None:
            ctx.fail(v, "expected PORT, SERVICE, HOST:PORT, [IPV6]:PORT or *:PORT, got %r" % v.text)
        out.append(v.text)
    return tuple(out)


def _dns_server(ctx, values) -> Tuple[str, int]:
    v = _one(ctx, values)
    hp = split_hostport(v.text)
    if hp is None or not _is_ip(hp[0]) or (hp[1] is not None and not hp[1].isdigit()):
        ctx.fail(v, "expected IP or IP:PORT, got %r" % v.text)
    return hp[0], int(hp[1]) if hp[1] else 53


def _argv(ctx, values) -> Tuple[str, ...]:
    words = _words(ctx, values)
    for v in values:
        for var in re.findall(r"\$\{([^}]*)\}", v.text):
            if var not in PIPE_VARIABLES:
                ctx.fail(v, "unknown variable ${%s}: expected one of %s"
                         % (var, ", ".join("${%s}" % x for x in PIPE_VARIABLES)))
    return words


def _metrics_listen(ctx, values) -> str:
    v = _one(ctx, values)
    hp = split_hostport(v.text) if not v.text.isdigit() else ("127.0.0.1", v.text)
    if hp is None or hp[1] is None or not hp[1].isdigit() or service_port(hp[1]) is None:
        ctx.fail(v, "expected PORT or HOST:PORT (a bare port binds 127.0.0.1), got %r" % v.text)
    return v.text


def address_in(address: str, networks: Tuple[str, ...]) -> bool:
    """Whether ``address`` (text) lies in one of ``networks`` (CIDR texts, as ``_networks`` stores them)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(n) for n in networks)


def _networks(ctx, values) -> Tuple[str, ...]:
    """Addresses or CIDR networks (``10.0.0.0/8``, ``::1``), stored as normalised network texts."""
    out = []
    for v in _words(ctx, values):
        try:
            out.append(str(ipaddress.ip_network(v, strict=False)))
        except ValueError:
            ctx.fail(values[len(out)], "expected an IP address or CIDR network, got %r" % v)
    return tuple(out)


def _dnsbl_zones(ctx, values) -> Tuple[str, ...]:
    """One or more DNS blocklist zones (``zen.spamhaus.org``): domain names, lower case, no final dot."""
    out = []
    for v, zone in zip(values, _domains(ctx, values)):
        labels = zone.split(".")
        if len(zone) > 200 or not all(re.fullmatch(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", x) for x in labels):
            ctx.fail(v, "expected a DNS zone such as zen.spamhaus.org, got %r" % v.text)
        out.append(zone)
    return tuple(out)


def _policy(ctx, values) -> Tuple[str, ...]:
    """``module:function`` references; one that cannot be imported is a machine problem (SPEC 6)."""
    from pmaster.policy.callables import import_problem, parse_reference

    words = _words(ctx, values)
    for v, text in zip(values, words):
        if parse_reference(text) is None:
            ctx.fail(v, "expected module:function, got %r" % text)
    for v, text in zip(values, words):
        problem = import_problem(text, ctx.basedir)
        if problem is not None:
            ctx.loader.machine_problem(Position(ctx.file, v.line, v.col), "policy %s: %s" % (text, problem))
    return words


def _policy_service(ctx, values) -> str:
    """``inet:HOST:PORT``, ``unix:/PATH`` or ``exec:COMMAND ARGS...`` (SPEC 6), kept as one string."""
    from pmaster.policy.service import parse_endpoint

    words = _words(ctx, values)
    is_exec = bool(words) and words[0].startswith("exec:")
    text = "exec:" + " ".join(shlex.quote(w) for w in [words[0][5:]] + list(words[1:])) if is_exec else " ".join(words)
    if len(words) > 1 and not is_exec:
        ctx.fail(values[1], "'policy-service' takes one value unless it is exec:COMMAND ARGS...")
    try:
        kind, target = parse_endpoint(text)
    except ValueError as exc:
        ctx.fail(values[0], str(exc))
    if kind == "exec" and not (shutil.which(target[0]) and os.access(shutil.which(target[0]), os.X_OK)):
        ctx.loader.machine_problem(Position(ctx.file, values[0].line, values[0].col),
                                   "policy-service: no such program: %s" % target[0])
    return text


SCHEMA = {
    "core": {
        "logger": _Key(_ident), "user-id": _Key(_str), "group-id": _Key(_str), "pid-file": _Key(_path),
        "spool-directory": _Key(_path), "local-mailer": _Key(_ident), "hostname": _Key(_str),
        "workers": _Key(_int_min(1)), "retry-min": _Key(_duration), "retry-max": _Key(_duration),
        "queue-lifetime": _Key(_duration), "dns-server": _Key(_dns_server), "recipient-delimiter": _Key(_str),
        "local-domains": _Key(_domains), "min-free-space": _Key(_size),
        "destination-concurrency": _Key(_int_min(1)), "trusted-networks": _Key(_networks),
        "allow-open-relay": _Key(_bool),
    },
    "syslog": {"ident": _Key(_str), "facility": _Key(_enum(*FACILITIES))},
    "logfile": {"file": _Key(_path)},
    "smtpd": {
        "name": _Key(_str), "listen-port": _Key(_listen, repeat=True), "routing-table": _Key(_ident),
        "logger": _Key(_ident), "local-rcpt-to": _Key(_bool), "tls-certificate": _Key(_path),
        "tls-key": _Key(_path), "require-tls": _Key(_bool), "max-message-size": _Key(_size),
        "max-recipients": _Key(_int_min(1)), "max-connections": _Key(_int_min(1)),
        "max-connections-per-ip": _Key(_int_min(1)), "timeout": _Key(_duration),
        "spf": _Key(_enum("off", "tag", "reject")), "dnsbl": _Key(_dnsbl_zones, repeat=True),
        "policy": _Key(_policy, repeat=True),
        "policy-service": _Key(_policy_service), "policy-service-timeout": _Key(_duration),
        "proxy-protocol": _Key(_bool, supported=False, default=False),
        "bare-newline": _Key(_enum("normalize", "reject")),
    },
    "pipe": {"exec": _Key(_argv), "max_rcpt_to": _Key(_int_min(1)), "user": _Key(_str), "timeout": _Key(_duration)},
    "relay": {
        "name": _Key(_str), "address": _Key(lambda ctx, vals: (_hostport(ctx, vals),), repeat=True),
        "port": _Key(_port), "tls": _Key(_enum("opportunistic", "required", "none")),
        "tls-ca-file": _Key(_path), "auth-user": _Key(_str), "auth-password-file": _Key(_path),
        "helo-name": _Key(_str), "verify-recipients": _Key(_bool),
    },
    "metrics": {"listen-port": _Key(_metrics_listen)},
    "webadmin": {"listen-port": _Key(_metrics_listen), "password-file": _Key(_path),
                 "tls-certificate": _Key(_path), "tls-key": _Key(_path)},
}


def split_hostport(text: str) -> Optional[Tuple[str, Optional[str]]]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port or None); None when malformed."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::([A-Za-z0-9_-]+))?", text)
    if m:
        return m.group(1), m.group(2)
    if text.count(":") > 1:
        return (text, None) if _is_ip(text) else None
    m = re.fullmatch(r"([A-Za-z0-9_.*-]+)(?::([A-Za-z0-9_-]+))?", text)
    if not m:
        return None
    return m.group(1), m.group(2)


def parse_listen(text: str, ident: str) -> Optional[Tuple[str, str]]:
    """A ``listen-port`` value -> (host, port-or-service); a bare port binds to IDENT; '*' means all addresses."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return ident, text
    hp = split_hostport(text)
    if hp is None or hp[1] is None:
        return None
    return hp[0], hp[1]


def service_port(service: str) -> Optional[int]:
    if service.isdigit():
        port = int(service)
        return port if 0 < port < 65536 else None
    try:
        return socket.getservbyname(service, "tcp")
    except OSError:
        return KNOWN_SERVICES.get(service)


def _is_ip(text: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except (OSError, ValueError):  # ValueError: a NUL in the text
            pass
    return False


class _Section:
    def __init__(self, kind: str, ident: Optional[str], file: str, line: int, col: int, basedir: str):
        self.kind = kind
        self.ident = ident
        self.pos = Position(file, line, col)
        self.basedir = basedir
        self.values: Dict[str, Any] = {}
        self.key_pos: Dict[str, Position] = {}
        self.entries: Dict[str, RouteEntry] = {}
        self.failed: Set[str] = set()  # keys given with a bad value (already reported)


class _Loader:
    def __init__(self, path: str, machine: bool):
        self.path = path
        self.machine = machine
        self.diagnostics: List[Diagnostic] = []
        self.sections: List[_Section] = []
        self.by_key: Dict[Tuple[str, Optional[str]], _Section] = {}
        self.misspelt_kind = False
        self.texts: Dict[str, str] = {}  # absolute path -> text to judge instead of the file (web admin)
        self.files: List[str] = []  # every file read, the main one first

    # -- diagnostics

    def error(self, pos: Position, message: str) -> None:
        self.diagnostics.append(Diagnostic(pos.file, pos.line, pos.col, "error", message))

    def warning(self, pos: Position, message: str) -> None:
        self.diagnostics.append(Diagnostic(pos.file, pos.line, pos.col, "warning", message))

    def machine_problem(self, pos: Position, message: str) -> None:
        """Problems of the machine, not the file: warnings in check, errors at start (SPEC 9)."""
        (self.error if self.machine else self.warning)(pos, message)

    # -- reading

    def read_file(self, path: str, pos: Optional[Position]) -> Optional[str]:
        if os.path.abspath(path) not in self.files:
            self.files.append(os.path.abspath(path))
        if os.path.abspath(path) in self.texts:
            return self.texts[os.path.abspath(path)]
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            message = "cannot read %s: %s" % (path, exc.strerror or exc)
            if pos is None:
                raise PmasterError("cannot read configuration %s: %s" % (path, exc.strerror or exc)) from None
            self.machine_problem(pos, message)
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = raw.decode("utf-8", "replace")
            before = raw[:exc.start].decode("utf-8", "replace")
            line = before.count("\n") + 1
            col = len(before) - (before.rfind("\n") + 1) + 1
            self.error(Position(path, line, col), "invalid UTF-8 byte 0x%02x" % raw[exc.start])
            return text

    def load(self) -> None:
        text = self.read_file(self.path, None)
        basedir = os.path.dirname(os.path.abspath(self.path))
        items, diags = cf.parse(text or "", self.path)
        self.diagnostics.extend(diags)
        route = self.open_section("route", None, Position(self.path, 1, 1), basedir, implicit=True)
        current: Optional[_Section] = route
        for item in items:
            if isinstance(item, cf.Header):
                current = self.open_header(item, basedir)
                continue
            if current is None:
                continue  # inside an unknown section: ignored (warned at its header)
            self.statement(current, item, basedir, self.path, [os.path.realpath(self.path)])

    def open_header(self, h: cf.Header, basedir: str) -> Optional[_Section]:
        pos = Position(self.path, h.line, h.col)
        kind = h.kind.lower()
        if kind not in KINDS:
            close = difflib.get_close_matches(kind, KINDS, n=1, cutoff=0.6)
            if close:
                self.misspelt_kind = True
                message = "unknown section kind [%s]: did you mean [%s]?" % (h.kind, close[0])
                (self.error if self.machine else self.warning)(pos, message)
            else:
                self.warning(pos, "unknown section kind [%s], ignored" % h.kind)
            return None
        if kind in NAMED_KINDS and not h.ident:
            self.error(pos, "[%s] needs a name: [%s NAME]" % (kind, kind))
            return None
        if kind in SINGLETON_KINDS and h.ident:
            self.error(Position(self.path, h.line, h.ident_col), "[%s] takes no name" % kind)
        ident = h.ident if kind not in SINGLETON_KINDS else None
        return self.open_section(kind, ident, pos, basedir)

    def open_section(self, kind: str, ident: Optional[str], pos: Position, basedir: str,
                     implicit: bool = False) -> _Section:
        key = (kind, ident)
        existing = self.by_key.get(key)
        if existing is not None:
            if kind == "route":
                return existing  # [route] may be reopened: entries merge
            label = "[%s]" % kind if ident is None else "[%s %s]" % (kind, ident)
            self.error(pos, "duplicate section %s (first at line %d)" % (label, existing.pos.line))
            return _Section(kind, ident, pos.file, pos.line, pos.col, basedir)  # checked, then dropped
        sec = _Section(kind, ident, pos.file, pos.line, pos.col, basedir)
        self.by_key[key] = sec
        self.sections.append(sec)
        return sec

    def statement(self, sec: _Section, st: cf.Statement, basedir: str, file: str, stack: List[str]) -> None:
        if sec.kind == "route":
            self.route_statement(sec, st, basedir, file, stack)
            return
        schema = SCHEMA[sec.kind]
        name = st.key.text
        pos = Position(file, st.key.line, st.key.col)
        spec = schema.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, list(schema), n=1, cutoff=0.6)
            hint = "; did you mean '%s'?" % close[0] if close else ""
            self.error(pos, "unknown key '%s' in [%s]%s" % (name, sec.kind, hint))
            return
        ctx = _Ctx(self, st, basedir, file)
        try:
            value = spec.conv(ctx, st.values)
        except _ValueError as exc:
            self.error(Position(file, exc.value.line, exc.value.col), exc.message)
            sec.failed.add(name)  # reported: no second "needs 'exec'" error for the same line
            return
        if not spec.supported and value != spec.default:
            self.error(pos, "'%s' is not supported yet by this version of pmaster" % name)
            return
        if name in sec.values and not spec.repeat:
            first = sec.key_pos[name]
            self.error(pos, "'%s' given twice (first at line %d); only address, listen-port, policy and dnsbl repeat"
                       % (name, first.line))
            return
        if spec.repeat:
            sec.values[name] = sec.values.get(name, ()) + tuple(value)
        else:
            sec.values[name] = value
        sec.key_pos.setdefault(name, pos)

    # -- routing tables

    def route_statement(self, sec: _Section, st: cf.Statement, basedir: str, file: str, stack: List[str]) -> None:
        pos = Position(file, st.key.line, st.key.col)
        if st.key.kind == "word" and st.key.text == "file":
            self.include(sec, st, basedir, file, stack)
            return
        key = st.key.text.lower()
        problem = _route_key_problem(key)
        if problem:
            self.error(pos, problem)
            return
        targets: List[TargetExpr] = []
        for i, v in enumerate(st.values):
            vpos = Position(file, v.line, v.col)
            if i > 0 and not v.comma_before:
                self.error(vpos, "expected ',' between targets")
                return
            target = self.target(v, vpos)
            if target is None:
                return
            targets.append(target)
        if key in sec.entries:
            first = sec.entries[key].pos
            self.error(pos, "duplicate routing key '%s' (first at %s:%d)"
                       % (st.key.text, os.path.basename(first.file), first.line))
            return
        sec.entries[key] = RouteEntry(key, tuple(targets), pos)

    def target(self, v: cf.Value, pos: Position) -> Optional[TargetExpr]:
        if v.kind != "call":
            if not v.text or v.text in ("@",) or v.text.count("@") > 1 and not v.text.startswith('"'):
                self.error(pos, "bad target %r: expected an address, @domain, a name, relay(...) or pipe(...)"
                           % v.text)
                return None
            return TargetExpr("word", (v.text,), v.text, pos)
        name, inner = v.text.split("(", 1)
        inner = inner[:-1]
        if name == "pipe":
            if not inner.strip():
                self.error(pos, "pipe() needs a command line")
                return None
            return TargetExpr("pipe", (inner.strip(),), v.text, pos)
        hosts = tuple(h.strip() for h in inner.split(","))
        if hosts == ("",):
            hosts = ()
        for h in hosts:
            hp = split_hostport(h) if h else None
            if hp is None or (hp[1] is not None and (not hp[1].isdigit() or service_port(hp[1]) is None)):
                self.error(pos, "bad host %r in relay(): expected HOST, HOST:PORT or [IPV6]:PORT" % h)
                return None
        return TargetExpr("relay", hosts, v.text, pos)

    def include(self, sec: _Section, st: cf.Statement, basedir: str, file: str, stack: List[str]) -> None:
        pos = Position(file, st.key.line, st.key.col)
        if len(st.values) != 1 or st.values[0].kind == "call":
            self.error(pos, "expected file \"PATH\"")
            return
        if "\0" in st.values[0].text:
            self.error(Position(file, st.values[0].line, st.values[0].col), "a file name cannot contain NUL")
            return
        path = os.path.normpath(os.path.join(basedir, st.values[0].text))
        real = os.path.realpath(path)
        if real in stack:
            self.error(pos, "include loop: %s includes itself" % path)
            return
        if len(stack) > MAX_INCLUDE_DEPTH:
            self.error(pos, "includes nested deeper than %d" % MAX_INCLUDE_DEPTH)
            return
        text = self.read_file(path, pos)
        if text is None:
            return
        items, diags = cf.parse(text, path)
        self.diagnostics.extend(diags)
        inc_dir = os.path.dirname(os.path.abspath(path))
        for item in items:
            if isinstance(item, cf.Header):
                self.error(Position(path, item.line, item.col),
                           "section headers are not allowed in an included routing file")
                continue
            self.statement(sec, item, inc_dir, path, stack + [real])

    # -- building the model

    def build(self) -> Config:
        core = self.build_core()
        syslog = self.build_simple("syslog", SyslogConfig, {})
        logfiles = {s.ident: LogfileConfig(s.ident, s.values.get("file", "")) for s in self.of("logfile")}
        for s in self.of("logfile"):
            if "file" not in s.values and "file" not in s.failed:
                self.error(s.pos, "[logfile %s] needs 'file'" % s.ident)
        smtpd = {s.ident: self.build_smtpd(s) for s in self.of("smtpd")}
        pipes = {s.ident: self.build_pipe(s, core) for s in self.of("pipe")}
        relays = {s.ident: self.build_relay(s) for s in self.of("relay")}
        routes = {s.ident: RouteTable(s.ident, dict(s.entries), s.pos) for s in self.of("route")}
        if core.local_mailer == "procmail" and "procmail" not in pipes and "procmail" not in relays:
            pipes["procmail"] = PipeConfig("procmail", DEFAULT_PROCMAIL, max_rcpt_to=1)
        metrics_sec = self.section("metrics")
        metrics = MetricsConfig(metrics_sec.values.get("listen-port")) if metrics_sec else None
        webadmin = self.build_webadmin()
        config = Config(path=os.path.abspath(self.path), core=core, syslog=syslog, logfiles=logfiles, smtpd=smtpd,
                        pipes=pipes, relays=relays, routes=routes, metrics=metrics, webadmin=webadmin)
        self.check_references(config)
        return config

    def of(self, kind: str) -> List[_Section]:
        return [s for s in self.sections if s.kind == kind]

    def section(self, kind: str) -> Optional[_Section]:
        return self.by_key.get((kind, None))

    def build_simple(self, kind: str, cls, renames: Dict[str, str]):
        sec = self.section(kind)
        if sec is None:
            return cls()
        return cls(**{renames.get(k, k.replace("-", "_")): v for k, v in sec.values.items()})

    def build_core(self) -> CoreConfig:
        sec = self.section("core")
        values = dict(sec.values) if sec else {}
        if "hostname" not in values:
            values["hostname"] = _default_hostname(self.machine)
        core = CoreConfig(**{k.replace("-", "_"): v for k, v in values.items()})
        if sec:
            if core.retry_min > core.retry_max:
                self.error(sec.key_pos.get("retry-min", sec.pos), "retry-min is larger than retry-max")
            for key, db in (("user-id", pwd.getpwnam), ("group-id", grp.getgrnam)):
                name = values.get(key)
                if name is not None and not _exists(db, name):
                    what = "user" if key == "user-id" else "group"
                    self.machine_problem(sec.key_pos[key], "no such %s: %r" % (what, name))
        return core

    def build_webadmin(self) -> Optional[WebadminConfig]:
        """[webadmin] (SPEC 8): HTTPS needs both files; a listener off loopback without them is a warning."""
        sec = self.section("webadmin")
        if sec is None:
            return None
        cfg = self.build_simple("webadmin", WebadminConfig, {})
        if bool(cfg.tls_certificate) != bool(cfg.tls_key):
            self.error(sec.pos, "[webadmin] needs both tls-certificate and tls-key for HTTPS")
        for key in ("tls-certificate", "tls-key", "password-file"):
            path = sec.values.get(key)
            if path and not os.path.isfile(path):
                self.machine_problem(sec.key_pos[key], "%s: no such file: %s" % (key, path))
        if not cfg.password_file:
            self.warning(sec.pos, "[webadmin] has no password-file: nobody can log in")
        host = "127.0.0.1" if cfg.listen_port.isdigit() else (split_hostport(cfg.listen_port) or ("", None))[0]
        if not cfg.tls_certificate and not _is_loopback_host(host):
            self.warning(sec.key_pos.get("listen-port", sec.pos),
                         "[webadmin] listens on %s without tls-certificate: passwords and sessions travel "
                         "in plain text" % cfg.listen_port)
        return cfg

    def build_smtpd(self, s: _Section) -> SmtpdConfig:
        values = {k.replace("-", "_"): v for k, v in s.values.items()}
        values.setdefault("name", s.ident)
        values["listen_ports"] = values.pop("listen_port", None) or ("%s:smtp" % _listen_host(s.ident),)
        values["policies"] = values.pop("policy", ())
        cfg = SmtpdConfig(ident=s.ident, pos=s.pos, **values)
        if bool(cfg.tls_certificate) != bool(cfg.tls_key):
            self.error(s.pos, "[smtpd %s] needs both tls-certificate and tls-key for STARTTLS" % s.ident)
        for key in ("tls-certificate", "tls-key"):
            path = s.values.get(key)
            if path and not os.path.isfile(path):
                self.machine_problem(s.key_pos[key], "%s: no such file: %s" % (key, path))
        for text in cfg.listen_ports:
            listen = parse_listen(text, _listen_host(s.ident))
            if listen is None:
                self.error(s.pos, "[smtpd %s] needs listen-port: its name is not a host name" % s.ident)
                continue
            if service_port(listen[1]) is None:
                self.machine_problem(s.key_pos.get("listen-port", s.pos), "unknown service %r" % listen[1])
        return cfg

    def build_pipe(self, s: _Section, core: CoreConfig) -> PipeConfig:
        values = dict(s.values)
        if "exec" not in values:
            if "exec" not in s.failed:
                self.error(s.pos, "[pipe %s] needs 'exec'" % s.ident)
            values["exec"] = ("/bin/false",)
        cfg = PipeConfig(ident=s.ident, exec=values.pop("exec"), pos=s.pos,
                         **{k.replace("-", "_"): v for k, v in values.items()})
        if cfg.max_rcpt_to > 1:
            for word in cfg.exec:
                for var in ("RCPT_TO", "RCPT_DOMAIN", "EXTENSION"):
                    if "${%s}" % var in word and word != "${%s}" % var:
                        self.error(s.key_pos["exec"], "with max_rcpt_to > 1, ${%s} may only stand as a whole word"
                                   % var)
        if cfg.user is not None:
            if core.user_id is not None:
                self.error(s.key_pos["user"], "'user' needs the daemon to run as root, but [core] user-id drops "
                           "root; give the program a setuid bit instead")
            elif not _exists(pwd.getpwnam, cfg.user):
                self.machine_problem(s.key_pos["user"], "no such user: %r" % cfg.user)
        return cfg

    def build_relay(self, s: _Section) -> RelayConfig:
        values = {k.replace("-", "_"): v for k, v in s.values.items()}
        values.setdefault("name", s.ident)
        values["addresses"] = values.pop("address", ())
        cfg = RelayConfig(ident=s.ident, pos=s.pos, **values)
        if cfg.auth_user and not cfg.auth_password_file:
            self.error(s.key_pos["auth-user"], "auth-user needs auth-password-file")
        return self.relay_tls_for_auth(s, cfg)

    def relay_tls_for_auth(self, s: _Section, cfg: RelayConfig) -> RelayConfig:
        """With ``auth-user`` the effective ``tls`` is ``required`` (issue 17 item 7).

        Opportunistic TLS verifies no certificate, so a man in the middle with a self-signed one would
        receive the password: the default becomes ``required``, and an explicit weaker ``tls`` is an error.
        """
        if not cfg.auth_user:
            return cfg
        if "tls" not in s.values:
            return dataclasses.replace(cfg, tls="required")
        if cfg.tls != "required":
            self.error(s.key_pos["tls"], "auth-user needs tls = required: with tls = %s the password could go to "
                       "a server whose certificate is not verified" % cfg.tls)
        return cfg

    def check_references(self, config: Config) -> None:
        loggers = set(BUILTIN_LOGGERS) | set(config.logfiles)
        core_sec = self.section("core")
        if config.core.logger is not None and config.core.logger not in loggers:
            self.error(core_sec.key_pos["logger"], _undefined("logger", config.core.logger, loggers))
        mailers = set(config.pipes) | set(config.relays)
        if config.core.local_mailer not in mailers:
            pos = core_sec.key_pos["local-mailer"] if core_sec else Position(self.path, 1, 1)
            self.error(pos, _undefined("local-mailer: no [pipe] or [relay] section", config.core.local_mailer,
                                       mailers))
        tables = {t for t in config.routes if t is not None}
        for s in self.of("smtpd"):
            cfg = config.smtpd[s.ident]
            if cfg.logger is not None and cfg.logger not in loggers:
                self.error(s.key_pos["logger"], _undefined("logger", cfg.logger, loggers))
            if cfg.routing_table is not None and cfg.routing_table not in tables:
                self.error(s.key_pos["routing-table"],
                           _undefined("routing-table: no [route] section", cfg.routing_table, tables))


def _undefined(what: str, name: str, known: Set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    hint = "; did you mean '%s'?" % close[0] if close else ""
    return "undefined %s %r%s" % (what, name, hint)


def _route_key_problem(key: str) -> Optional[str]:
    if key.startswith('"'):
        return None
    if key.count("@") > 1:
        return "bad routing key %r: expected local@domain, local@, @domain, @ or a name" % key
    local, _, domain = key.partition("@")
    if domain and not re.fullmatch(r"[a-z0-9_.-]+|\[[0-9a-f:.]+\]", domain):
        return "bad domain in routing key %r" % key
    return None


def _exists(lookup: Callable, name: str) -> bool:
    try:
        lookup(name)
        return True
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        return False


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name (or *): it may resolve to anything


def _listen_host(ident: str) -> str:
    return "[%s]" % ident if ":" in ident else ident


def _default_hostname(machine: bool) -> str:
    name = socket.gethostname()
    if machine and "." not in name:
        name = socket.getfqdn()
    return name.lower().rstrip(".") or "localhost"


def load_with_diagnostics(path: str, machine: bool = False, texts: Optional[Dict[str, str]] = None
                          ) -> Tuple[Optional[Config], List[Diagnostic]]:
    """Parse and build; returns the config (None when errors prevent building) and every diagnostic.

    ``texts`` maps absolute file paths to contents judged instead of the files (an edit not yet saved).
    """
    loader = _Loader(path, machine)
    loader.texts = {os.path.abspath(k): v for k, v in (texts or {}).items()}
    loader.load()
    config = loader.build()
    diags = sorted(loader.diagnostics, key=lambda d: (d.file != path, d.file, d.line, d.col))
    if any(d.is_error for d in diags):
        return None, diags
    return Config(**{**config.__dict__, "diagnostics": tuple(diags)}), diags


def config_files(path: str, texts: Optional[Dict[str, str]] = None) -> List[str]:
    """The configuration file and every routing file it includes (absolute paths, the main one first)."""
    loader = _Loader(path, False)
    loader.texts = {os.path.abspath(k): v for k, v in (texts or {}).items()}
    loader.load()
    return loader.files


def load(path: str, machine: bool = False) -> Config:
    config, diags = load_with_diagnostics(path, machine)
    if config is None:
        raise ConfigError([d for d in diags if d.is_error] or diags)
    return config
