"""The SMTP server inside a real ``pmaster run`` process: listen-port forms, start-up errors, the shipped
configuration, memory on a large message (issue 3 points 1, 6, 8 and 10)."""

import os
import resource
import shutil
import socket
import subprocess
import sys
import time

import pytest

from pmaster.tests.daemon_fixture import (
    REPO,
    DaemonFactory,
    DaemonProcess,
    RawClient,
    free_dual_port,
    render,
    wait_for,
)

LISTENERS = """\
[core]
  hostname = mx.test
  spool-directory = {spool}
  pid-file = {tmp}/run/pmaster.pid
  min-free-space = 1k

[smtpd localhost]
  name = bare.test
  listen-port = {port}

[smtpd v4]
  name = v4.test
  listen-port = 127.0.0.1:{port1}
  routing-table = strict
  max-recipients = 1

[smtpd v6]
  name = v6.test
  listen-port = [::1]:{port2}

[smtpd "::1"]
  name = v6bare.test
  listen-port = {port3}

[smtpd all]
  name = all.test
  listen-port = *:{dual}

[route]
  @example.org  pipe(cat >/dev/null)

[route strict]
  only@strict.test  pipe(cat >/dev/null)
"""


@pytest.fixture
def daemons(tmp_path):
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.stop_all()


def code(reply) -> str:
    return " ".join(reply[-1].split()[:2])


class Listeners:
    def __init__(self, daemon: DaemonProcess, ports: dict):
        self.daemon = daemon
        self.ports = ports


@pytest.fixture(scope="module")
def listeners(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("listeners")
    ports = {"port2": _free_v6(), "port3": _free_v6(), "dual": free_dual_port()}
    daemon = DaemonProcess(tmp, LISTENERS, extra_ports=1, values=ports)
    ports.update({"localhost": daemon.port, "v4": daemon.ports[1], "v6": ports["port2"], "v6bare": ports["port3"],
                  "all": ports["dual"]})
    daemon.start()
    yield Listeners(daemon, ports)
    daemon.stop()


def _free_v6() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


def greet(host: str, port: int):
    with RawClient(host, port) as c:
        return c.greeting[0], c.cmd("EHLO client.test")[0]


def test_bare_port_binds_the_addresses_of_the_ident(listeners):
    assert greet("127.0.0.1", listeners.ports["localhost"]) == ("220 bare.test ESMTP Postmaster", "250-bare.test")


def test_host_port_binds_that_address(listeners):
    assert greet("127.0.0.1", listeners.ports["v4"]) == ("220 v4.test ESMTP Postmaster", "250-v4.test")


def test_bracketed_ipv6_binds_that_address(listeners):
    assert greet("::1", listeners.ports["v6"]) == ("220 v6.test ESMTP Postmaster", "250-v6.test")


def test_bare_port_on_an_ipv6_ident_binds_it(listeners):
    assert greet("::1", listeners.ports["v6bare"])[0] == "220 v6bare.test ESMTP Postmaster"


def test_star_port_binds_ipv4_and_ipv6(listeners):
    port = listeners.ports["all"]
    assert greet("127.0.0.1", port)[0] == "220 all.test ESMTP Postmaster"
    assert greet("::1", port)[0] == "220 all.test ESMTP Postmaster"


def test_each_listener_has_its_own_routing_table_and_limits(listeners):
    with RawClient("127.0.0.1", listeners.ports["v4"]) as c:
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        assert code(c.cmd("RCPT TO:<only@strict.test>")) == "250 2.1.5"
        assert code(c.cmd("RCPT TO:<joe@example.org>")) == "452 4.5.3"  # max-recipients = 1
    with RawClient("127.0.0.1", listeners.ports["localhost"]) as c:
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        assert code(c.cmd("RCPT TO:<only@strict.test>")) == "550 5.1.1"
        assert code(c.cmd("RCPT TO:<joe@example.org>")) == "250 2.1.5"
        assert code(c.cmd("RCPT TO:<bob@example.org>")) == "250 2.1.5"


def test_binary_junk_never_kills_the_daemon(listeners):
    port = listeners.ports["localhost"]
    for payload in (bytes(range(256)) * 64, b"\x00" * 5000 + b"\r\n", b"EHLO \xff\r\n" * 20):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(payload)
    assert listeners.daemon.running()
    with RawClient("127.0.0.1", port) as c:
        assert code(c.cmd("NOOP")) == "250 2.0.0"


# ----- start-up errors


def run_pmaster(config_path: str, cwd: str, timeout: float = 30):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # Only pmaster's own output is judged: an interpreter or library warning (cryptography warns on
    # Python 3.8) is not ours.
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run([sys.executable, "-m", "pmaster", "run", "-c", config_path], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)


def _write_config(tmp_path, listen: str) -> str:
    text = render(LISTENERS.split("[smtpd localhost]")[0], spool=tmp_path / "spool", tmp=tmp_path)
    text += "[smtpd test]\n  listen-port = %s\n\n[route]\n  @example.org  pipe(cat >/dev/null)\n" % listen
    path = str(tmp_path / "pmaster.cf")
    with open(path, "w") as f:
        f.write(text)
    return path


def assert_one_line_error(result, *words):
    err = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], err


def test_port_in_use_is_one_clear_line_and_non_zero_exit(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_pmaster(_write_config(tmp_path, "127.0.0.1:%d" % port), str(tmp_path))
    assert_one_line_error(result, str(port), "in use")


def test_unresolvable_listen_host_is_one_clear_line_and_non_zero_exit(tmp_path):
    result = run_pmaster(_write_config(tmp_path, "no-such-host.invalid:2525"), str(tmp_path))
    assert_one_line_error(result, "no-such-host.invalid")


# ----- the shipped configuration


def test_shipped_configuration_delivers_swaks_mail_into_maildir(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    with open(os.path.join(REPO, "conf", "postmaster.cf")) as f:
        text = f.read()
    assert "127.0.0.1:2525" in text
    # 2525 may be taken by a test running in parallel: the copy listens on a free port
    daemon = DaemonProcess(tmp_path, text.replace("127.0.0.1:2525", "127.0.0.1:{port}"),
                           config_path=str(conf / "postmaster.cf"))
    daemon.start()
    try:
        result = subprocess.run(["/usr/bin/swaks", "--server", "127.0.0.1:%d" % daemon.port, "--to",
                                 "joe@localhost", "--from", "alice@example.org", "--body", "shipped config"],
                                capture_output=True, timeout=30)
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
        new = tmp_path / "var" / "mail" / "joe" / "new"
        assert wait_for(lambda: new.is_dir() and os.listdir(str(new)), 15), daemon.log_text()
        (name,) = os.listdir(str(new))
        assert b"shipped config" in (new / name).read_bytes()
        assert (tmp_path / "var" / "spool" / "queue").is_dir()
    finally:
        daemon.stop()
    shutil.rmtree(str(tmp_path / "var"), ignore_errors=True)


# ----- memory


BIG_CONFIG = """\
[core]
  hostname = mx.test
  spool-directory = {spool}
  pid-file = {tmp}/run/pmaster.pid
  min-free-space = 1k

[smtpd test]
  name = mx.test
  listen-port = 127.0.0.1:{port}
  max-message-size = 40M

[route]
  @example.org  relay(192.0.2.1)
"""


def test_30_mib_message_does_not_grow_the_daemon_by_its_size(daemons):
    daemon = daemons(BIG_CONFIG)
    line = b"x" * 1022 + b"\r\n"
    chunk = line * 1024  # 1 MiB
    with RawClient("127.0.0.1", daemon.port, timeout=60) as c:
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test> SIZE=%d" % (30 * len(chunk)))
        c.cmd("RCPT TO:<joe@example.org>")
        assert c.cmd("DATA")[0].startswith("354")
        before = daemon.rss_kib()
        c.send(b"Subject: big\r\n\r\n")
        for _ in range(30):
            c.send(chunk)
        c.send(b".\r\n")
        reply = c.reply()
        after = daemon.rss_kib()
    assert code(reply) == "250 2.0.0", reply
    qid = reply[-1].split()[-1]
    assert os.path.getsize(os.path.join(daemon.spool_dir, "queue", qid + ".msg")) > 30 * len(chunk)
    assert after - before < 8 * 1024, "RSS grew by %d KiB for a 30 MiB message" % (after - before)


def test_sigterm_stops_the_daemon_cleanly(daemons):
    daemon = daemons()
    start = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - start < 10


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_storage_failure_mid_body_answers_452_4_3_1_and_leaves_nothing(daemons):
    # As root no permission makes a write fail: a file size limit does (the daemon ignores SIGXFSZ).
    daemon = daemons(BIG_CONFIG, preexec_fn=_limit_file_size)
    with RawClient("127.0.0.1", daemon.port) as c:
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<joe@example.org>")
        assert c.cmd("DATA")[0].startswith("354")
        c.send(b"Subject: too big for the disk\r\n\r\n" + (b"y" * 998 + b"\r\n") * 600)
        c.send(b"MAIL FROM:<smuggled@x.test>\r\n.\r\n")
        assert code(c.reply()) == "452 4.3.1"
        assert code(c.cmd("NOOP")) == "250 2.0.0"  # the body was read to its end, not taken for commands
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<joe@example.org>")
        assert c.cmd("DATA")[0].startswith("354")
        c.send(b"Subject: small\r\n\r\nfits\r\n.\r\n")
        assert code(c.reply()) == "250 2.0.0"
    assert len(daemon.queue_ids()) == 1
    assert daemon.spool_files("tmp") == []
    assert daemon.running()
