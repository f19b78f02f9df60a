"""Routing: resolve a recipient address to its final deliveries (SPEC section 3). Pure: no I/O but passwd.

API:
  ``Router(config, is_local_user=...)``; ``router.resolve(address, table=None, local_rcpt_to=False)``
     -> ``List[Target]``, or raises ``RouteError`` carrying the reply RCPT answers.
  ``static_check(config) -> List[Diagnostic]``: loops, dead targets and open relays, for ``pmaster check``.
  ``Target``: one final delivery: the final address, the mailer ("pipe" or "relay"), and ``target``, what the
     envelope stores (a section name or the literal ``relay(...)`` / ``pipe(...)`` text).
Key precedence for ``local@domain`` (first found wins; a named table falls back to the unnamed ``[route]``
  for each key it lacks): ``local@domain``, then ``base@domain`` for ``base+ext@domain``; ``local@`` (and
  ``base@``) when the domain is ours; ``@domain``; ``@``. A bare name looks up ``name``, then ``name@``.
Targets: an address or ``@domain`` resolves again; a bare word is a key, then a ``[pipe]``/``[relay]``
  section, then (with a dot) a host for ``relay(NAME)``, else a local user for ``local-mailer``. A bare word
  naming the entry it stands in (``root root``, ``joe@ joe``) skips the key lookup, as a self-referencing alias.
Errors: no route answers ``550 5.1.1``. A loop or resolution deeper than 20 is a configuration error and
  answers ``451 4.3.0`` (as Postfix defers on its own configuration errors: fixing the file lets the mail in).
  If any target of an entry fails, the whole address fails.
"""

import pwd
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

from pmaster.config import Config, RouteEntry, TargetExpr
from pmaster.envelope import Recipient, split_address
from pmaster.errors import Diagnostic, PmasterError, RouteError
from pmaster.reply import Reply

MAX_DEPTH = 20
POSTMASTER = "postmaster"


def no_route(address: str) -> RouteError:
    return RouteError(Reply(550, "5.1.1", "<%s>: Recipient address rejected: no route" % address))


def _config_error(address: str, why: str) -> RouteError:
    return RouteError(Reply(451, "4.3.0", "<%s>: Temporary lookup failure: %s" % (address, why)), why)


@dataclass(frozen=True)
class Target:
    address: str  # final recipient
    original: str  # as given
    mailer: str  # "pipe" or "relay"
    target: str  # section name, or the literal relay(...) / pipe(...)
    name: Optional[str] = None  # section name, None for inline calls and bare host names
    hosts: Tuple[str, ...] = ()  # relay: hosts in order; () with relay() means MX
    command: Optional[str] = None  # inline pipe: the shell command line
    argv: Tuple[str, ...] = ()  # pipe section: exec words expanded for this recipient (MAIL_FROM left as is)
    extension: str = ""

    def as_json(self) -> Dict[str, object]:
        out: Dict[str, object] = {"address": self.original, "recipient": self.address, "mailer": self.mailer,
                                  "name": self.name}
        if self.mailer == "relay":
            out["hosts"] = list(self.hosts)
        elif self.command is not None:
            out["command"] = self.command
        else:
            out["argv"] = list(self.argv)
        return out

    def describe(self) -> str:
        if self.mailer == "relay":
            where = ", ".join(self.hosts) if self.hosts else "MX of %s" % (split_address(self.address)[1] or "?")
            via = "[relay %s]" % self.name if self.name else self.target
            return "%s -> %s via %s (%s)" % (self.original, self.address, via, where)
        if self.command is not None:
            return "%s -> %s via %s" % (self.original, self.address, self.target)
        return "%s -> %s via [pipe %s]: %s" % (self.original, self.address, self.name, " ".join(self.argv))


def _is_passwd_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except (KeyError, ValueError):
        return False


@dataclass
class _Walk:
    original: str
    extension: str = ""
    path: List[str] = field(default_factory=list)
    keys: List[str] = field(default_factory=list)  # keys of the entries being expanded, innermost last


class Router:
    def __init__(self, config: Config, is_local_user: Callable[[str], bool] = _is_passwd_user):
        self.config = config
        self.is_local_user = is_local_user
        self.local_domains = set(config.local_domains())
        self.delimiters = config.core.recipient_delimiter
        self.our_domains = self.local_domains | self._key_domains()

    def _key_domains(self) -> Set[str]:
        out = set()
        for table in self.config.routes.values():
            for key in table.entries:
                domain = key.partition("@")[2]
                if domain:
                    out.add(domain)
        return out

    # -- public

    def resolve(self, address: str, table: Optional[str] = None, local_rcpt_to: bool = False) -> List[Target]:
        walk = _Walk(original=address)
        targets = self._address(address, table, local_rcpt_to, walk, 0)
        out: List[Target] = []
        for t in targets:
            if t not in out:
                out.append(t)
        return out

    def lookup(self, key: str, table: Optional[str]) -> Optional[RouteEntry]:
        if table is not None:
            named = self.config.routes.get(table)
            if named is not None and key in named.entries:
                return named.entries[key]
        default = self.config.routes.get(None)
        return default.entries.get(key) if default is not None else None

    # -- resolution

    def _address(self, address: str, table: Optional[str], local_rcpt_to: bool, walk: _Walk,
                 depth: int) -> List[Target]:
        local, domain = split_address(address)
        if not domain:
            return self._bare(local, table, local_rcpt_to, walk, depth)
        entry, extension = self._find(local, domain, table)
        if entry is None and local.lower() == POSTMASTER and domain in self.our_domains:
            return self._bare(POSTMASTER, table, False, walk, depth)
        if entry is None:
            raise no_route(walk.original)
        if extension and not walk.extension:
            walk.extension = extension
        return self._entry(entry, "%s@%s" % (local, domain), table, local_rcpt_to, walk, depth)

    def _find(self, local: str, domain: str, table: Optional[str]) -> Tuple[Optional[RouteEntry], str]:
        lower = local.lower()
        base, ext = self._split_extension(lower)
        candidates = ["%s@%s" % (lower, domain)]
        if base is not None:
            candidates.append("%s@%s" % (base, domain))
        if domain in self.local_domains:
            candidates.append("%s@" % lower)
            if base is not None:
                candidates.append("%s@" % base)
        candidates += ["@%s" % domain, "@"]
        for key in candidates:
            entry = self.lookup(key, table)
            if entry is not None:
                used_base = base is not None and key.startswith(base + "@") and not key.startswith(lower + "@")
                return entry, ext if used_base else ""
        return None, ""

    def _split_extension(self, local: str) -> Tuple[Optional[str], str]:
        if not self.delimiters:
            return None, ""
        for i, ch in enumerate(local):
            if ch in self.delimiters and i > 0:
                return local[:i], local[i + 1:]
        return None, ""

    def _bare(self, name: str, table: Optional[str], local_rcpt_to: bool, walk: _Walk, depth: int) -> List[Target]:
        lower = name.lower()
        base, ext = self._split_extension(lower)
        for key in [lower, lower + "@"] + ([base, base + "@"] if base is not None else []):
            entry = self.lookup(key, table)
            if entry is not None:
                if base is not None and key.startswith(base) and not key.startswith(lower) and not walk.extension:
                    walk.extension = ext
                return self._entry(entry, name, table, local_rcpt_to, walk, depth)
        if lower == POSTMASTER:
            return [self._local_user(POSTMASTER, walk)]
        if local_rcpt_to and self.is_local_user(base if base is not None else name):
            if base is not None:
                walk.extension = ext
            return [self._local_user(base if base is not None else name, walk)]
        raise no_route(walk.original)

    def _entry(self, entry: RouteEntry, address: str, table: Optional[str], local_rcpt_to: bool, walk: _Walk,
               depth: int) -> List[Target]:
        if depth >= MAX_DEPTH:
            raise _config_error(walk.original, "routing deeper than %d at key '%s'" % (MAX_DEPTH, entry.key))
        marker = "%s|%s" % (entry.key, address.lower())
        if marker in walk.path:
            raise _config_error(walk.original, "routing loop at key '%s'" % entry.key)
        walk.path.append(marker)
        walk.keys.append(entry.key)
        try:
            out: List[Target] = []
            for expr in entry.targets:
                out.extend(self._target(expr, address, table, local_rcpt_to, walk, depth + 1))
            return out
        finally:
            walk.path.pop()
            walk.keys.pop()

    def _target(self, expr: TargetExpr, address: str, table: Optional[str], local_rcpt_to: bool, walk: _Walk,
                depth: int) -> List[Target]:
        if expr.kind == "relay":
            text = "relay(%s)" % ", ".join(expr.args)
            return [self._final(address, "relay", text, walk, hosts=expr.args)]
        if expr.kind == "pipe":
            return [self._final(address, "pipe", expr.text, walk, command=expr.args[0])]
        word = expr.args[0]
        local, _, domain = word.rpartition("@") if "@" in word else (word, "", "")
        if "@" in word:
            if not local:  # @domain: keep the local part
                local = split_address(address)[0]
            return self._address("%s@%s" % (local, domain), table, local_rcpt_to, walk, depth)
        return self._word(word, address, table, walk, depth)

    def _word(self, word: str, address: str, table: Optional[str], walk: _Walk, depth: int) -> List[Target]:
        lower = word.lower()
        entry = self.lookup(lower, table) or self.lookup(lower + "@", table)
        # A name that refers to the entry naming it (`root root`, `joe@ joe`) means the local user or
        # mailer of that name, as a self-referencing alias does in sendmail and Postfix: not a loop.
        if entry is not None and not (walk.keys and walk.keys[-1] == entry.key):
            return self._entry(entry, word, table, False, walk, depth)
        if word in self.config.pipes:
            return [self._final(address, "pipe", word, walk, name=word)]
        if word in self.config.relays:
            relay = self.config.relays[word]
            return [self._final(address, "relay", word, walk, name=word, hosts=relay.addresses or (relay.name,))]
        if "." in word:
            return [self._final(address, "relay", "relay(%s)" % word, walk, hosts=(word,))]
        return [self._local_user(word, walk)]

    def _local_user(self, user: str, walk: _Walk) -> Target:
        mailer = self.config.core.local_mailer
        if mailer in self.config.relays:
            relay = self.config.relays[mailer]
            return self._final(user, "relay", mailer, walk, name=mailer, hosts=relay.addresses or (relay.name,))
        return self._final(user, "pipe", mailer, walk, name=mailer)

    def _final(self, address: str, mailer: str, target: str, walk: _Walk, name: Optional[str] = None,
               hosts: Tuple[str, ...] = (), command: Optional[str] = None) -> Target:
        argv: Tuple[str, ...] = ()
        if mailer == "pipe" and name is not None and name in self.config.pipes:
            argv = tuple(_expand_for_display(self.config.pipes[name].exec, address, walk.extension))
        return Target(address=address, original=walk.original, mailer=mailer, target=target, name=name,
                      hosts=tuple(hosts), command=command, argv=argv, extension=walk.extension)


def _expand_for_display(words: Tuple[str, ...], address: str, extension: str) -> List[str]:
    domain = split_address(address)[1]
    values = {"${RCPT_TO}": address, "${RCPT_DOMAIN}": domain, "${EXTENSION}": extension}
    out = []
    for word in words:
        for var, value in values.items():
            word = word.replace(var, value)
        out.append(word)
    return out


# ----------------------------------------------------------------------------------------------------
# Static checks for `pmaster check`.

LOOPBACK_HOSTS = ("localhost", "ip6-localhost", "ipv6-localhost", "ip6-loopback", "::1")


def route_one(router: "Router", address: str, table: Optional[str] = None) -> Tuple[List[Target], Optional[str]]:
    """``pmaster route`` for one address (the CLI and the web admin's route tester): (targets, None), or
    ([], the reply) when it has no route. A malformed address raises ``PmasterError``."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if not address or any(c.isspace() for c in address):
        raise PmasterError("bad address %r" % address)
    try:
        return router.resolve(address, table, local_rcpt_to=True), None
    except RouteError as exc:
        return [], str(exc.reply)


def static_check(config: Config) -> List[Diagnostic]:
    out: List[Diagnostic] = []
    router = Router(config, is_local_user=lambda name: True)
    for ident, table in config.routes.items():
        for entry in table.entries.values():
            probe = _probe_address(entry.key, config)
            try:
                router._entry(entry, probe, ident, False, _Walk(original=probe), 0)
            except RouteError as exc:
                severity = "error" if exc.reply.code == 451 else "warning"
                why = str(exc) if severity == "error" else "a target of '%s' has no route" % entry.key
                out.append(Diagnostic(entry.pos.file, entry.pos.line, entry.pos.col, severity, why))
    out.extend(_open_relay_warnings(config, router))
    return out


def _probe_address(key: str, config: Config) -> str:
    if "@" not in key:
        return key
    local, _, domain = key.partition("@")
    return "%s@%s" % (local or "probe", domain or config.core.hostname)


def _open_relay_warnings(config: Config, router: Router) -> List[Diagnostic]:
    """Open relays (issue 17 item 12): an error unless ``[core] allow-open-relay = yes``, then a warning."""
    from pmaster.config import parse_listen  # local: only check needs listen parsing here

    out = []
    severity = "warning" if config.core.allow_open_relay else "error"
    for smtpd in config.smtpd.values():
        entry = router.lookup("@", smtpd.routing_table)
        if entry is None:
            continue
        hosts = [parse_listen(p, smtpd.ident) for p in smtpd.listen_ports]
        if all(h is not None and _is_loopback(h[0]) for h in hosts):
            continue
        pos = smtpd.pos
        out.append(Diagnostic(pos.file if pos else config.path, pos.line if pos else 1, pos.col if pos else 1,
                              severity, _open_relay_text(config, smtpd.ident, smtpd.routing_table, entry)))
    return out


def open_relay_problems(config: Config) -> List[Diagnostic]:
    """The open-relay diagnostics alone, for ``pmaster run`` (errors unless ``allow-open-relay``)."""
    return _open_relay_warnings(config, Router(config, is_local_user=lambda name: True))


def _open_relay_text(config: Config, ident: str, table: Optional[str], entry: RouteEntry) -> str:
    where = "%s:%d" % (entry.pos.file, entry.pos.line) if entry.pos else "the unnamed [route]"
    named = config.routes.get(table) if table is not None else None
    if named is not None and "@" not in named.entries:
        # The case that surprises: the named table has no '@' but inherits the unnamed table's (SPEC 3).
        why = ("its routing table %r has no '@' of its own and inherits the catch-all '@' of the unnamed [route] "
               "table (%s)" % (table, where))
    else:
        why = "its routing table has a catch-all '@' (%s)" % where
    hint = "" if config.core.allow_open_relay else "; set [core] allow-open-relay = yes if that is intended"
    return "[smtpd %s] listens beyond loopback and %s: it relays mail for any domain (an open relay)%s" % (
        ident, why, hint)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def bounce_recipients(address: str, config: Config) -> List[Recipient]:
    """Where a report to ``address`` goes: the unnamed ``[route]`` table, else ``relay()`` (SPEC 5)."""
    try:
        targets = Router(config).resolve(address, None, local_rcpt_to=("@" not in address))
    except RouteError:
        return [Recipient(address=address, original=address, mailer="relay", target="relay()")]
    return [Recipient(address=t.address, original=address, mailer=t.mailer, target=t.target, extension=t.extension)
            for t in targets]
