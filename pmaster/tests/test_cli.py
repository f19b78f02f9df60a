"""Tests for ``pmaster check`` and ``pmaster route`` run as real subprocesses (SPEC section 1)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXAMPLE = os.path.join(ROOT, "conf", "postmaster.cf.example")


def pmaster(*args, env=None, cwd=None):
    environ = {k: v for k, v in os.environ.items() if k != "PMASTER_CONFIG"}
    environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "pmaster"] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=environ, cwd=cwd or ROOT, timeout=60)


def write(tmp_path, text, name="p.cf"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def assert_user_error(proc):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr


# -- check


def test_check_accepts_design_note_example():
    assert pmaster("check", "-c", EXAMPLE).returncode == 0


def test_check_accepts_embedded_default_config():
    proc = pmaster("check", "-c", os.path.join(ROOT, "conf", "postmaster.cf"))
    assert proc.returncode == 0 and "error" not in proc.stderr


def test_check_prints_machine_warnings_but_exits_zero():
    proc = pmaster("check", "-c", EXAMPLE)
    assert proc.returncode == 0 and "%s:41:3: warning: cannot read /etc/postmaster.rt" % EXAMPLE in proc.stderr


def test_check_exit_zero_with_only_warnings(tmp_path):
    path = write(tmp_path, "[frobnicate]\n")
    proc = pmaster("check", "-c", path)
    assert (proc.returncode, proc.stderr) == (0, "%s:1:1: warning: unknown section kind [frobnicate], ignored\n" % path)


def test_check_prints_nothing_for_clean_file(tmp_path):
    proc = pmaster("check", "-c", write(tmp_path, "postmaster joe\n"))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_check_bad_config_prints_file_line_col_and_exits_1(tmp_path):
    path = write(tmp_path, "[core]\nworkrs = 3\nretry-min = 5x\n")
    proc = pmaster("check", "-c", path)
    assert_user_error(proc)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        "%s:2:1: error: unknown key 'workrs' in [core]; did you mean 'workers'?" % path,
        "%s:3:13: error: expected a duration such as 300, 5m, 4h or 5d, got '5x'" % path,
    ]


def test_check_reports_static_loop(tmp_path):
    path = write(tmp_path, "a@x.org b@x.org\nb@x.org a@x.org\n")
    proc = pmaster("check", "-c", path)
    assert proc.returncode == 1 and "%s:1:1: error: routing loop" % path in proc.stderr


def test_check_missing_config_file(tmp_path):
    proc = pmaster("check", "-c", str(tmp_path / "nope.cf"))
    assert_user_error(proc)
    assert proc.stderr.startswith("pmaster: ") and len(proc.stderr.splitlines()) == 1


def test_check_config_is_a_directory(tmp_path):
    proc = pmaster("check", "-c", str(tmp_path))
    assert_user_error(proc)
    assert len(proc.stderr.splitlines()) == 1


def test_check_open_relay_error_for_all_addresses(tmp_path):
    path = write(tmp_path, "[smtpd mx]\nlisten-port = 0.0.0.0:25\n[route]\n@ relay(smart.example.net)\n")
    proc = pmaster("check", "-c", path)
    assert proc.returncode == 1 and "%s:1:1: error:" % path in proc.stderr and "open relay" in proc.stderr


def test_check_open_relay_warning_with_allow_open_relay(tmp_path):
    path = write(tmp_path, "[core]\nallow-open-relay = yes\n[smtpd mx]\nlisten-port = 0.0.0.0:25\n[route]\n"
                           "@ relay(smart.example.net)\n")
    proc = pmaster("check", "-c", path)
    assert proc.returncode == 0 and "%s:3:1: warning:" % path in proc.stderr and "open relay" in proc.stderr


def test_check_no_open_relay_warning_on_loopback(tmp_path):
    path = write(tmp_path, "[smtpd mx]\nlisten-port = 127.0.0.1:2525\n[route]\n@ relay(smart.example.net)\n")
    proc = pmaster("check", "-c", path)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_pmaster_config_env_is_default_for_c(tmp_path):
    path = write(tmp_path, "[core]\nworkrs = 3\n")
    proc = pmaster("check", env={"PMASTER_CONFIG": path})
    assert proc.returncode == 1 and proc.stderr.startswith(path + ":2:1: error:")


def test_c_option_overrides_pmaster_config_env(tmp_path):
    bad = write(tmp_path, "[core]\nworkrs = 3\n", name="bad.cf")
    proc = pmaster("check", "-c", EXAMPLE, env={"PMASTER_CONFIG": bad})
    assert proc.returncode == 0


def test_check_relative_config_path(tmp_path):
    write(tmp_path, "postmaster joe\n")
    assert pmaster("check", "-c", "p.cf", cwd=str(tmp_path)).returncode == 0


# -- route


def test_route_extern_table_shows_mx():
    proc = pmaster("route", "-c", EXAMPLE, "--table", "extern", "joe@example.com")
    assert proc.returncode == 0 and "mx.example.net" in proc.stdout


def test_route_local_routes_root_goes_to_joe():
    proc = pmaster("route", "-c", EXAMPLE, "--table", "local-routes", "root")
    assert proc.returncode == 0 and proc.stdout.startswith("root -> joe via [pipe procmail]")


def test_route_json_relay_shape():
    proc = pmaster("route", "-c", EXAMPLE, "--table", "extern", "--json", "joe@example.com")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == [{"address": "joe@example.com", "recipient": "joe@example.org",
                                        "mailer": "relay", "name": None, "hosts": ["mx.example.net"]}]


def test_route_json_pipe_section_shape():
    proc = pmaster("route", "-c", EXAMPLE, "--json", "postmaster")
    assert json.loads(proc.stdout) == [{"address": "postmaster", "recipient": "joe", "mailer": "pipe",
                                        "name": "procmail",
                                        "argv": ["/usr/bin/procmail", "-f", "${MAIL_FROM}", "-d", "joe"]}]


def test_route_json_inline_pipe_and_mx_shape(tmp_path):
    path = write(tmp_path, "abuse@x.org pipe(/usr/bin/cat >/dev/null)\n@y.org relay()\n[relay hub]\naddress 10.0.0.1\n"
                 "[route]\n@z.org hub\n")
    proc = pmaster("route", "-c", path, "--json", "abuse@x.org", "u@y.org", "u@z.org")
    assert proc.returncode == 0 and json.loads(proc.stdout) == [
        {"address": "abuse@x.org", "recipient": "abuse@x.org", "mailer": "pipe", "name": None,
         "command": "/usr/bin/cat >/dev/null"},
        {"address": "u@y.org", "recipient": "u@y.org", "mailer": "relay", "name": None, "hosts": []},
        {"address": "u@z.org", "recipient": "u@z.org", "mailer": "relay", "name": "hub", "hosts": ["10.0.0.1"]},
    ]


def test_route_several_addresses_in_order(tmp_path):
    path = write(tmp_path, "a@x.org joe\nb@x.org jane\n")
    proc = pmaster("route", "-c", path, "b@x.org", "a@x.org")
    assert [line.split(" -> ")[0] for line in proc.stdout.splitlines()] == ["b@x.org", "a@x.org"]


def test_route_accepts_angle_brackets(tmp_path):
    proc = pmaster("route", "-c", write(tmp_path, "a@x.org joe\n"), "<a@x.org>")
    assert proc.returncode == 0 and proc.stdout.startswith("a@x.org -> joe")


def test_route_no_route_exits_1(tmp_path):
    proc = pmaster("route", "-c", write(tmp_path, "a@x.org joe\n"), "nobody@nowhere.example")
    assert proc.returncode == 1 and "550 5.1.1" in proc.stdout + proc.stderr


def test_route_exit_1_when_any_address_has_no_route(tmp_path):
    proc = pmaster("route", "-c", write(tmp_path, "a@x.org joe\n"), "a@x.org", "nobody@nowhere.example")
    assert proc.returncode == 1 and "a@x.org -> joe" in proc.stdout


def test_route_loop_exits_1_without_traceback(tmp_path):
    proc = pmaster("route", "-c", write(tmp_path, "a@x.org b@x.org\nb@x.org a@x.org\n"), "a@x.org")
    assert_user_error(proc)
    assert "451 4.3.0" in proc.stdout + proc.stderr


def test_route_unknown_table(tmp_path):
    proc = pmaster("route", "-c", EXAMPLE, "--table", "nope", "joe@example.com")
    assert_user_error(proc)
    assert proc.stderr.startswith("pmaster: ") and "nope" in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("address", ["a b@x.org", "", "<>"])
def test_route_bad_address(address):
    proc = pmaster("route", "-c", EXAMPLE, address)
    assert_user_error(proc)
    assert proc.stderr.startswith("pmaster: bad address") and len(proc.stderr.splitlines()) == 1


def test_route_missing_config_file(tmp_path):
    proc = pmaster("route", "-c", str(tmp_path / "nope.cf"), "a@x.org")
    assert_user_error(proc)
    assert proc.stderr.startswith("pmaster: ") and len(proc.stderr.splitlines()) == 1


def test_route_bad_config_prints_diagnostics(tmp_path):
    path = write(tmp_path, "a@x.org joe\n[core]\nworkers = many\n")
    proc = pmaster("route", "-c", path, "a@x.org")
    assert_user_error(proc)
    assert proc.stderr.splitlines() == ["%s:3:11: error: expected a whole number, got 'many'" % path]


def test_route_uses_pmaster_config_env(tmp_path):
    path = write(tmp_path, "a@x.org jane\n")
    proc = pmaster("route", "a@x.org", env={"PMASTER_CONFIG": path})
    assert proc.returncode == 0 and proc.stdout.startswith("a@x.org -> jane")


def test_usage_error_exits_2_without_traceback():
    proc = pmaster("route")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
