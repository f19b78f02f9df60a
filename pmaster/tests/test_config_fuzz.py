"""Property tests for the configuration loader: whatever the file holds, ``load`` raises only
``ConfigError``/``PmasterError``, ``load_with_diagnostics`` never raises for a readable file, and every
diagnostic has a 1-based position. Each example writes one file under a fresh temporary directory."""

import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmaster.config import load, load_with_diagnostics
from pmaster.errors import ConfigError, PmasterError
from pmaster.routing import Router, static_check

EXAMPLE_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "postmaster.cf.example")
with open(EXAMPLE_PATH, encoding="utf-8") as _f:
    EXAMPLE = _f.read()

# PMASTER_FUZZ_EXAMPLES raises the count for a long local run; no example database is written into the tree.
FUZZ = settings(max_examples=int(os.environ.get("PMASTER_FUZZ_EXAMPLES", "200")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# Characters that matter to the grammar, so mutations hit its corners more often than random text does.
SPECIAL = list('[]="\\(),#/@:*.${}\n\t -+') + [
    "\x00", "\xff", "\u00e9", "\u2028", "relay(", "pipe(", "//", "${RCPT_TO}", "file \"x\"", "[core]\n", "[smtpd ",
    "[pipe p]\nexec ", "[relay r]\n", "[route t]\n", "[logfile l]\n", "listen-port ", "address ", "max_rcpt_to 2\n",
    "local-mailer ", "routing-table ", "logger ", " = ", "postmaster ", "joe@example.com ", "@ ", "@example.org ",
    "user-id ", "group-id ", "dns-server ", "[pipe q]\nuser ", "tls-certificate ", "spool-directory ",
]


def check_file(data):
    """Write ``data`` (str or bytes) to a temp file and apply every property to it."""
    tmp = tempfile.mkdtemp(prefix="pmfuzz")
    try:
        path = os.path.join(tmp, "p.cf")
        with open(path, "wb") as f:
            f.write(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
        for machine in (False, True):
            config, diags = load_with_diagnostics(path, machine=machine)
            for d in diags:
                assert d.line >= 1 and d.col >= 1, str(d)
                assert d.severity in ("error", "warning") and d.message
            if config is not None:
                for d in static_check(config):
                    assert d.line >= 1 and d.col >= 1, str(d)
                exercise_router(config)
        try:
            load(path)
        except ConfigError as exc:
            assert exc.diagnostics and all(d.is_error for d in exc.diagnostics)
        except PmasterError:
            pass  # allowed by the contract of load()
    finally:
        shutil.rmtree(tmp)


def exercise_router(config):
    router = Router(config, is_local_user=lambda name: True)
    for table in [None] + sorted(t for t in config.routes if t):
        for address in ("postmaster", "joe@example.com", "root", "x@localhost"):
            try:
                router.resolve(address, table, local_rcpt_to=True)
            except PmasterError:
                pass


@FUZZ
@given(st.text(max_size=400))
def test_random_text_never_crashes_loader(text):
    check_file(text)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_loader(data):
    check_file(data)


@FUZZ
@given(st.lists(st.sampled_from(SPECIAL + list("abcxyz019 ")), max_size=60))
def test_grammar_tokens_never_crash_loader(pieces):
    check_file("".join(pieces))


mutation = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, len(EXAMPLE)), st.one_of(st.sampled_from(SPECIAL), st.text(max_size=3))),
    st.tuples(st.just("delete"), st.integers(0, len(EXAMPLE)), st.integers(1, 8)),
    st.tuples(st.just("replace"), st.integers(0, len(EXAMPLE)), st.sampled_from(SPECIAL)),
    st.tuples(st.just("duplicate"), st.integers(0, 80), st.integers(0, 80)),
)


def mutate(text, ops):
    for op, a, b in ops:
        a = min(a, len(text))
        if op == "insert":
            text = text[:a] + b + text[a:]
        elif op == "delete":
            text = text[:a] + text[a + b:]
        elif op == "replace":
            text = text[:a] + b + text[a + 1:]
        else:
            lines = text.split("\n")
            if lines:
                line = lines[a % len(lines)]
                lines.insert(b % (len(lines) + 1), line)
            text = "\n".join(lines)
    return text


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=6))
def test_mutated_example_never_crashes_loader(ops):
    check_file(mutate(EXAMPLE, ops))


def test_unreadable_file_raises_pmaster_error(tmp_path):
    try:
        load_with_diagnostics(str(tmp_path / "missing.cf"))
    except PmasterError as exc:
        assert not isinstance(exc, ConfigError) and "missing.cf" in str(exc)
    else:
        raise AssertionError("no PmasterError")
