"""The policy chain: the checks of one listener, run in SPEC 6 order at each SMTP stage.

API:
  ``STAGES``: ``("connect", "helo", "mail", "rcpt", "data")``.
  ``Outcome``: what the checks decided about one transaction besides refusing: ``prepend`` (header lines
     "Name: value", folded, without CRLF), ``hold`` / ``discard`` (a reason, or None), ``defer_if_permit`` /
     ``defer_if_reject`` (Postfix semantics, within the stage) and ``on_close(fn)`` (run once when the
     transaction ends: RSET, HELO/EHLO, STARTTLS, a new MAIL, the end of DATA, QUIT or a disconnect).
  ``Check``: base class; ``name`` is the reason label (``policy``, ``policy_service``, ``spf``, ``dnsbl``,
     ``verify``), ``stages`` where it runs, ``check(stage, view, outcome) -> Optional[Reply]``.
  ``Chain(checks_by_stage)``: ``run(stage, view, outcome) -> Optional[Reply]``; ``evaluate`` returns a
     ``Verdict`` (the reply and the name of the check it came from); ``stages`` that have checks.
  ``Resources``: objects that survive reloads (policy-service connection pools, running exec: programs,
     caches), keyed by the factory; ``get(key, create)``, and after a build ``sweep()`` closes the unused ones.
  ``build_chains(config, resources) -> Dict[str, Chain]``: one chain per ``[smtpd]`` ident.
  ``FACTORIES``: the extension table. Per position of SPEC 6 a list of ``"module:function"`` factories,
     each ``function(smtpd, config, resources) -> List[Check]``. Positions run per stage in ``ORDER``.
Invariants:
  - A reply of 400 or more refuses (the first one answers); a 2xx reply accepts the command at once with
    that text, skipping the later checks of the stage (as Postfix's OK); None goes on.
  - A check that raises answers 451 4.3.0; its traceback goes to the log only, never to the client.
  - DEFER_IF_PERMIT: 450 4.7.1 at the end of the stage (or instead of a later 2xx) unless a later check
    refuses. DEFER_IF_REJECT: a later 5xx refusal of the same stage becomes that 450 4.7.1; a 4xx stays.
  - With nothing configured every chain is empty and ``run`` returns None without calling anything.
Threading: chains and checks are shared by every session thread of a listener and must be thread-safe;
  an ``Outcome`` belongs to one session. ``build_chains`` runs in the thread that loads the configuration.
Errors: ``build_chains`` raises ``PmasterError`` (one line per problem) when a check cannot be built.
"""

import importlib
import logging
import threading
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from pmaster.errors import PmasterError
from pmaster.reply import Reply

log = logging.getLogger("pmaster.policy")

STAGES = ("connect", "helo", "mail", "rcpt", "data")

# SPEC 6: where each check answers, per stage, in this order.
ORDER: Dict[str, Tuple[str, ...]] = {
    "connect": ("policy",),
    "helo": ("policy",),
    "mail": ("spf", "policy"),
    "rcpt": ("dnsbl", "policy", "policy_service", "verify"),
    "data": ("policy",),
}

# Extension table: position -> factories "module:function", each ``function(smtpd, config, resources)``
# returning the checks of that position for one listener (an empty list when the listener has none).
FACTORIES: Dict[str, List[str]] = {
    "spf": ["pmaster.policy.spf:checks"],
    "dnsbl": ["pmaster.policy.dnsbl:checks"],
    "policy": ["pmaster.policy.callables:checks"],
    "policy_service": ["pmaster.policy.service:checks"],
    "verify": ["pmaster.policy.verify:checks"],
}

CHECK_FAILED = Reply(451, "4.3.0", "Temporary lookup failure")
DEFERRED = "Policy rejection not confirmed; try again later"


class Outcome:
    """Per transaction: headers to prepend, hold/discard, the stage's pending DEFER_IF_* and close hooks."""

    def __init__(self) -> None:
        self.prepend: List[str] = []
        self.hold: Optional[str] = None
        self.discard: Optional[str] = None
        self._if_permit: Optional[Reply] = None
        self._if_reject: Optional[Reply] = None
        self._closers: List[Callable[[], None]] = []
        self._closed = False
        self._current = "policy"  # the check running now: the reason of a DEFER_IF_PERMIT it leaves
        self._if_permit_owner = "policy"

    def defer_if_permit(self, reply: Optional[Reply] = None) -> None:
        """Answer ``reply`` (default 450 4.7.1) at the end of this stage unless a later check refuses."""
        if self._if_permit is None:
            self._if_permit = reply or Reply(450, "4.7.1", DEFERRED)
            self._if_permit_owner = self._current

    def defer_if_reject(self, reply: Optional[Reply] = None) -> None:
        """If a later check of this stage refuses with 5xx, answer ``reply`` (default 450 4.7.1) instead."""
        if self._if_reject is None:
            self._if_reject = reply or Reply(450, "4.7.1", DEFERRED)

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        """Run the close hooks once; a failing hook is logged and the others still run."""
        if self._closed:
            return
        self._closed = True
        closers, self._closers = self._closers, []
        for fn in closers:
            try:
                fn()
            except Exception:
                log.exception("policy: close hook failed")

    def _begin_stage(self) -> None:
        self._if_permit = self._if_reject = None


class Check:
    """Base class of every check; subclasses set ``name`` and ``stages`` and implement ``check``."""

    name = "policy"
    stages: FrozenSet[str] = frozenset()

    def check(self, stage: str, view: Any, outcome: Outcome) -> Optional[Reply]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return "<%s %s>" % (type(self).__name__, self.name)


class Verdict:
    __slots__ = ("reply", "reason")

    def __init__(self, reply: Optional[Reply], reason: str):
        self.reply = reply
        self.reason = reason


_NO_VERDICT = Verdict(None, "")


class Chain:
    """The checks of one listener, per stage in SPEC 6 order."""

    def __init__(self, checks: Dict[str, Sequence[Check]]):
        self._by_stage: Dict[str, Tuple[Check, ...]] = {s: tuple(checks.get(s, ())) for s in STAGES}
        self.stages: FrozenSet[str] = frozenset(s for s, c in self._by_stage.items() if c)

    def checks(self, stage: str) -> Tuple[Check, ...]:
        return self._by_stage.get(stage, ())

    def run(self, stage: str, view: Any, outcome: Outcome) -> Optional[Reply]:
        return self.evaluate(stage, view, outcome).reply

    def evaluate(self, stage: str, view: Any, outcome: Outcome) -> Verdict:
        checks = self._by_stage.get(stage)
        if not checks:
            return _NO_VERDICT
        outcome._begin_stage()
        for check in checks:
            outcome._current = check.name
            reply = _ask(check, stage, view, outcome)
            if reply is None:
                continue
            if reply.code < 400:
                break  # an explicit accept: DEFER_IF_PERMIT still applies below
            if reply.code >= 500 and outcome._if_reject is not None:
                return Verdict(outcome._if_reject, check.name)
            return Verdict(reply, check.name)
        else:
            reply = None
        pending, owner = outcome._if_permit, outcome._if_permit_owner
        outcome._begin_stage()
        if pending is not None:
            return Verdict(pending, owner)
        return Verdict(reply, check.name) if reply is not None else _NO_VERDICT


def _ask(check: Check, stage: str, view: Any, outcome: Outcome) -> Optional[Reply]:
    try:
        reply = check.check(stage, view, outcome)
    except Exception:
        log.exception("%s check failed at %s for [%s]", check.name, stage, getattr(view, "client_address", "?"))
        return CHECK_FAILED
    if reply is not None and not isinstance(reply, Reply):
        log.error("%s check returned %r at %s; answering 451 4.3.0", check.name, reply, stage)
        return CHECK_FAILED
    return reply


class Resources:
    """Objects that outlive one configuration (connection pools, child processes, caches).

    ``get(key, create)`` returns the object kept under ``key`` or makes it; ``sweep()`` (after a build)
    closes, through their ``close()``, the objects no build asked for since the previous sweep.
    """

    def __init__(self, metrics: Callable[[], Any] = lambda: None):
        self.metrics = metrics  # -> pmaster.metrics.Metrics or None (set late by the daemon)
        self._lock = threading.Lock()
        self._objects: Dict[Any, Any] = {}
        self._used: Set[Any] = set()

    def get(self, key: Any, create: Callable[[], Any]) -> Any:
        with self._lock:
            self._used.add(key)
            obj = self._objects.get(key)
            if obj is None:
                obj = self._objects[key] = create()
            return obj

    def sweep(self) -> None:
        with self._lock:
            gone = [(k, o) for k, o in self._objects.items() if k not in self._used]
            for k, _ in gone:
                del self._objects[k]
            self._used = set()
        for _, obj in gone:
            _close_quietly(obj)

    def close(self) -> None:
        with self._lock:
            objects, self._objects = list(self._objects.values()), {}
            self._used = set()
        for obj in objects:
            _close_quietly(obj)


def _close_quietly(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:
        log.exception("policy: cannot close %r", obj)


def _factory(text: str) -> Callable:
    module, _, function = text.partition(":")
    return getattr(importlib.import_module(module), function)


def build_chains(config: Any, resources: Resources) -> Dict[str, Chain]:
    """One chain per ``[smtpd]`` section; objects of ``resources`` no chain uses any more are closed."""
    chains: Dict[str, Chain] = {}
    problems: List[str] = []
    for ident, smtpd in config.smtpd.items():
        by_position: Dict[str, List[Check]] = {}
        for position, names in FACTORIES.items():
            for name in names:
                try:
                    by_position.setdefault(position, []).extend(_factory(name)(smtpd, config, resources))
                except PmasterError as exc:
                    problems.append(str(exc))
        checks = {stage: [c for p in ORDER[stage] for c in by_position.get(p, ()) if stage in c.stages]
                  for stage in STAGES}
        chains[ident] = Chain(checks)
    if problems:
        raise PmasterError("\n".join(problems))
    resources.sweep()
    return chains
