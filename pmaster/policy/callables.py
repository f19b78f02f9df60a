"""``policy = module:function``: Python callables asked at every stage of the SMTP dialogue (SPEC 6 and 9).

API:
  ``parse_reference(text) -> (module, function)`` or None when ``text`` is not ``module:function``.
  ``load_function(text, basedir) -> callable``: imports the module from ``basedir`` (the configuration
     file's directory) first, then from ``sys.path``; raises ``PolicyImportError`` with the reason.
  ``import_problem(text, basedir) -> Optional[str]``: the reason ``load_function`` would fail, or None
     (the configuration loader's check: a warning in ``pmaster check``, an error at start and reload).
  ``to_reply(value) -> Reply`` or raises ``BadReply``: validates what a callable returned.
  ``CallableCheck(text, function)``: the ``Check``; ``checks(smtpd, config, resources)``: the chain factory.
Invariants:
  - Every build of the chains (start, SIGHUP) imports the modules again: a module found in the
    configuration directory gets a fresh module object (its top-level code runs again, its state starts
    over); a module from ``sys.path`` is ``importlib.reload``-ed. Within one build a module is imported once.
    The configuration check imports them too, so top-level code runs once more at start and reload.
  - An exception answers 451 4.3.0 and logs the traceback; a return value that is not None, ``(code, text)``
    or ``(code, enhanced, text)`` with a 2xx/4xx/5xx code answers 451 4.3.5 and is logged.
  - A reply without an enhanced code gets one (2.0.0, 4.7.1, 5.7.1), or takes it from the start of its text.
Threading: a callable is called from every session thread at once; it must be thread-safe itself.
Errors: ``PolicyImportError`` from loading; ``checks`` raises ``PmasterError`` naming the listener.
"""

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

from pmaster.errors import PmasterError
from pmaster.policy.chain import STAGES, Check, Outcome, Resources
from pmaster.reply import Reply

log = logging.getLogger("pmaster.policy")

BAD_REPLY = Reply(451, "4.3.5", "Server configuration problem")
FAILED = Reply(451, "4.3.0", "Temporary lookup failure")
_REFERENCE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):([A-Za-z_][A-Za-z0-9_]*)")
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")
_DEFAULT_ENHANCED = {2: "2.0.0", 4: "4.7.1", 5: "5.7.1"}


class PolicyImportError(Exception):
    """A policy reference that cannot be loaded; the message is the reason."""


class BadReply(ValueError):
    """What a callable returned is not a reply."""


def parse_reference(text: str) -> Optional[Tuple[str, str]]:
    m = _REFERENCE.fullmatch(text)
    return (m.group(1), m.group(2)) if m else None


def import_problem(text: str, basedir: str) -> Optional[str]:
    try:
        load_function(text, basedir, {})
    except PolicyImportError as exc:
        return str(exc)
    return None


def load_function(text: str, basedir: str, modules: Optional[Dict[str, types.ModuleType]] = None) -> Callable:
    """The function ``text`` names; ``modules`` caches the modules of one build (None: a private cache)."""
    ref = parse_reference(text)
    if ref is None:
        raise PolicyImportError("expected module:function, got %r" % text)
    name, function = ref
    cache = {} if modules is None else modules
    module = cache.get(name)
    if module is None:
        module = cache[name] = _import(name, basedir)
    fn = getattr(module, function, None)
    if fn is None:
        raise PolicyImportError("module %s (%s) has no function %r"
                                % (name, getattr(module, "__file__", None) or "built-in", function))
    if not callable(fn):
        raise PolicyImportError("%s.%s is not callable" % (name, function))
    return fn


def _import(name: str, basedir: str) -> types.ModuleType:
    top = name.split(".", 1)[0]
    try:
        spec = importlib.machinery.PathFinder.find_spec(top, [basedir]) if basedir else None
        if spec is not None and spec.loader is not None:
            module = _fresh(top, spec)
            return module if top == name else _import_path(name)
        return _import_path(name)
    except PolicyImportError:
        raise
    except SyntaxError as exc:
        raise PolicyImportError("cannot import %s: %s:%s: %s" % (name, exc.filename, exc.lineno, exc.msg))
    except Exception as exc:  # whatever the module's own code raises while it is imported
        raise PolicyImportError("cannot import %s: %s: %s" % (name, type(exc).__name__, exc))


def _fresh(name: str, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    """A new module object for ``spec``, registered under ``name`` (dataclasses and pickle look it up)."""
    module = importlib.util.module_from_spec(spec)
    old = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except BaseException:
        if old is not None:
            sys.modules[name] = old
        else:
            sys.modules.pop(name, None)
        raise
    for sub in [m for m in sys.modules if m.startswith(name + ".")]:
        del sys.modules[sub]  # submodules of the old package are imported again below it
    return module


def _import_path(name: str) -> types.ModuleType:
    loaded = sys.modules.get(name)
    if loaded is not None:
        return importlib.reload(loaded)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise PolicyImportError("no module named %r" % (exc.name or name))


def to_reply(value: Any) -> Reply:
    """``(code, text)`` or ``(code, enhanced, text)`` with a 2xx/4xx/5xx code -> Reply; else ``BadReply``."""
    if not isinstance(value, tuple) or len(value) not in (2, 3):
        raise BadReply("expected None, (code, text) or (code, enhanced, text)")
    code, enhanced, text = (value[0], None, value[1]) if len(value) == 2 else value
    # RFC 5321 4.2: the first digit 2, 4 or 5 here (3xx is only for DATA), the second 0 to 5.
    if not isinstance(code, int) or isinstance(code, bool) or not 200 <= code <= 599 or code // 100 == 3 \
            or code // 10 % 10 > 5:
        raise BadReply("code %r is not a 2xx, 4xx or 5xx reply code" % (code,))
    if not isinstance(text, str) or "\r" in text or "\0" in text:
        raise BadReply("text %r is not a string without CR and NUL" % (text,))
    if enhanced is None:
        m = re.match(r"([245]\.\d{1,3}\.\d{1,3}) ", text)
        if m and m.group(1)[0] == str(code)[0]:
            enhanced, text = m.group(1), text[m.end():]
        else:
            enhanced = _DEFAULT_ENHANCED[code // 100]
    if not isinstance(enhanced, str) or not _ENHANCED.fullmatch(enhanced) or enhanced[0] != str(code)[0]:
        raise BadReply("enhanced code %r does not match %d" % (enhanced, code))
    return Reply(code, enhanced, text.rstrip("\n") or "Policy decision")


class CallableCheck(Check):
    name = "policy"
    stages = frozenset(STAGES)

    def __init__(self, reference: str, function: Callable[[str, Any], Any]):
        self.reference = reference
        self.function = function

    def check(self, stage: str, view: Any, outcome: Outcome) -> Optional[Reply]:
        try:
            value = self.function(stage, view)
        except Exception:
            log.exception("policy %s raised at %s for [%s]; answering 451 4.3.0", self.reference, stage,
                          view.client_address)
            return FAILED
        if value is None:
            return None
        try:
            return to_reply(value)
        except BadReply as exc:
            log.error("policy %s returned %r at %s: %s; answering 451 4.3.5", self.reference, value, stage, exc)
            return BAD_REPLY

    def __repr__(self) -> str:
        return "<policy %s>" % self.reference


def checks(smtpd: Any, config: Any, resources: Resources) -> List[Check]:
    """The chain factory: one check per ``policy`` line of the listener, in the order given."""
    if not smtpd.policies:
        return []
    basedir = os.path.dirname(os.path.abspath(config.path))
    # One import per module per build: the cache is kept under a key only this build uses, so the
    # next build's sweep drops it.
    modules = resources.get(("policy-modules", id(config)), dict)
    out: List[Check] = []
    for text in smtpd.policies:
        try:
            out.append(CallableCheck(text, load_function(text, basedir, modules)))
        except PolicyImportError as exc:
            raise PmasterError("[smtpd %s] policy %s: %s" % (smtpd.ident, text, exc))
    return out
