"""Bad configuration files: each file in bad_configs/ states its own expected diagnostics.

Every ``*.cf`` file there starts with comment lines of the form

    # expect: [FILE:]LINE:COL SEVERITY [TEXT]
    # expect-machine: [FILE:]LINE:COL SEVERITY [TEXT]

``expect`` lines are what ``pmaster check`` reports (``load_with_diagnostics(machine=False)`` plus
``static_check``); ``expect-machine`` lines, when present, are what ``pmaster run`` reports
(``machine=True``). FILE defaults to the file itself (included ``*.rt`` files live beside it); TEXT, when
given, must occur in the message. The lists must match exactly (positions and severities, in order).
"""

import os
import re

import pytest

from pmaster.config import load, load_with_diagnostics
from pmaster.errors import ConfigError, Diagnostic
from pmaster.routing import static_check

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bad_configs")
FILES = sorted(f for f in os.listdir(HERE) if f.endswith(".cf"))
EXPECT = re.compile(rb"^# (expect|expect-machine): (?:(\S+?):)?(\d+):(\d+) (error|warning)(?: (.*))?$")


def expectations(path):
    """-> {"expect": [(file, line, col, severity, text)], "expect-machine": [...]}, from the leading comments."""
    out = {"expect": [], "expect-machine": []}
    with open(path, "rb") as f:
        for raw in f.read().split(b"\n"):
            m = EXPECT.match(raw)
            if not m:
                break
            kind, file, line, col, severity, text = m.groups()
            name = os.path.join(HERE, file.decode()) if file else path
            out[kind.decode()].append((name, int(line), int(col), severity.decode(), (text or b"").decode()))
    return out


def diagnostics(path, machine):
    config, diags = load_with_diagnostics(path, machine=machine)
    if config is not None:
        diags = list(diags) + static_check(config)
    return sorted(diags, key=lambda d: (d.file != path, d.file, d.line, d.col))


def compare(actual, expected):
    got = [(d.file, d.line, d.col, d.severity) for d in actual]
    want = [e[:4] for e in expected]
    assert got == want, "\n".join(str(d) for d in actual)
    for d, e in zip(actual, expected):
        assert e[4] in d.message, "%r not in %s" % (e[4], d)


def test_there_are_enough_bad_files():
    assert len(FILES) >= 25


@pytest.mark.parametrize("name", FILES)
def test_bad_config_diagnostics(name):
    path = os.path.join(HERE, name)
    expected = expectations(path)
    assert expected["expect"], "%s has no '# expect:' line" % name
    compare(diagnostics(path, machine=False), expected["expect"])


@pytest.mark.parametrize("name", [n for n in FILES if expectations(os.path.join(HERE, n))["expect-machine"]])
def test_bad_config_diagnostics_at_start(name):
    path = os.path.join(HERE, name)
    compare(diagnostics(path, machine=True), expectations(path)["expect-machine"])


@pytest.mark.parametrize("name", FILES)
def test_every_diagnostic_has_a_position(name):
    for d in diagnostics(os.path.join(HERE, name), machine=True):
        assert d.line >= 1 and d.col >= 1 and d.severity in ("error", "warning") and d.message


# -- behaviours around the files


def test_load_raises_config_error_with_every_error():
    with pytest.raises(ConfigError) as info:
        load(os.path.join(HERE, "many_bad_lines.cf"))
    assert [d.line for d in info.value.diagnostics] == [7, 8, 9, 10, 13]


def test_config_error_text_is_file_line_col_lines():
    path = os.path.join(HERE, "unknown_key.cf")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == "%s:3:3: error: unknown key 'workrs' in [core]; did you mean 'workers'?" % path


def test_diagnostic_str_format():
    assert str(Diagnostic("f.cf", 3, 7, "warning", "odd")) == "f.cf:3:7: warning: odd"


def test_warnings_alone_do_not_fail_load():
    config = load(os.path.join(HERE, "unknown_section_kind.cf"))
    assert [d.severity for d in config.diagnostics] == ["warning"]


def test_misspelt_kind_fails_load_at_start():
    with pytest.raises(ConfigError):
        load(os.path.join(HERE, "misspelt_kind.cf"), machine=True)


def test_spf_off_alone_is_accepted(tmp_path):
    path = tmp_path / "p.cf"
    path.write_text("[smtpd localhost]\nspf = off\nproxy-protocol = no\n")
    assert load(str(path)).smtpd["localhost"].spf == "off"


def test_smtpd_name_that_is_no_host_needs_listen_port(tmp_path):
    path = tmp_path / "p.cf"
    path.write_text('[smtpd "main listener"]\n')
    _, diags = load_with_diagnostics(str(path))
    assert [(d.line, d.col, d.severity) for d in diags] == [(1, 1, "error")]


def test_include_name_with_nul_is_an_error(tmp_path):
    path = tmp_path / "p.cf"
    path.write_text('file "a\\\0b"\n'.replace("\\", ""))
    _, diags = load_with_diagnostics(str(path))
    assert [(d.line, d.col, d.severity) for d in diags] == [(1, 6, "error")]
