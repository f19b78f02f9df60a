"""Typed, read-only configuration model built from the grammar's output.

API:
  ``load(path, machine=False) -> Config``: parse and validate; raises ``ConfigError`` with every error.
     Warnings are kept in ``Config.diagnostics``. With ``machine=True`` (``pmaster run``), problems that
     depend on the machine (missing include file, unknown user, unresolvable host) are errors, else warnings.
  ``check(path) -> List[Diagnostic]``: every error and warning, for ``pmaster check``.
  The model classes below; every default of SPEC section 2 lives here.
Invariants: a ``Config`` is never mutated after ``load`` returns; SIGHUP swaps the whole object.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from pmaster.errors import Diagnostic

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
    proxy_protocol: bool = False
    bare_newline: str = "normalize"
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
