"""policy = module:function at every stage (SPEC 6 and 9), against a real listener in this process, a real
daemon for start errors and SIGHUP, and the two worked examples of contrib/policy/."""

import logging
import os
import shutil
import socket
import textwrap

import pytest

from pmaster.errors import PmasterError
from pmaster.metrics import Metrics
from pmaster.tests.daemon_fixture import REPO, DaemonProcess, InProcessSmtpd, RawClient, wait_until

CONFIG = """\
[core]
  hostname = mx.test
  spool-directory = {spool}
  pid-file = {tmp}/pmaster.pid
[smtpd test]
  name = mx.test
  listen-port = 127.0.0.1:{port}
  {policies}
[route]
  @example.org  pipe(cat >/dev/null)
"""


class _Smtpd(InProcessSmtpd):
    def client(self, **kwargs):
        c = RawClient(self.host, self.port, **kwargs)
        self.__dict__.setdefault("clients", []).append(c)
        return c

    def __exit__(self, *exc):
        for c in self.__dict__.get("clients", []):
            c.close()
        InProcessSmtpd.__exit__(self, *exc)


def _module(tmp_path, name, source):
    (tmp_path / (name + ".py")).write_text(textwrap.dedent(source))


def _smtpd(tmp_path, *policies):
    lines = "\n  ".join("policy = %s" % p for p in policies)
    return _Smtpd(tmp_path, CONFIG, values={"policies": lines})


def _until_rcpt(c, rcpt="u@example.org"):
    assert c.cmd("EHLO client.test")[-1].startswith("250")
    assert c.cmd("MAIL FROM:<s@sender.test> SIZE=77")[0].startswith("250")
    return c.cmd("RCPT TO:<%s>" % rcpt)


def _stage_refuser(tmp_path, name, stage, answer):
    _module(tmp_path, name, """\
        def check(stage, session):
            if stage == %r:
                return %r
            return None
        """ % (stage, answer))


def test_connect_5xx_replaces_the_greeting_and_only_quit_is_answered(tmp_path):
    _stage_refuser(tmp_path, "p_conn5", "connect", (554, "5.7.1", "go away"))
    with _smtpd(tmp_path, "p_conn5:check") as srv:
        c = srv.client()
        assert c.greeting == ["554 5.7.1 go away"]
        assert c.cmd("EHLO client.test")[0].startswith("503 5.5.1")
        assert c.cmd("MAIL FROM:<a@b.test>")[0].startswith("503 5.5.1")
        assert c.cmd("QUIT")[0].startswith("221")
        assert c.closed()


def test_connect_4xx_is_sent_as_421_and_the_connection_closed(tmp_path):
    _stage_refuser(tmp_path, "p_conn4", "connect", (450, "busy"))
    with _smtpd(tmp_path, "p_conn4:check") as srv:
        c = srv.client()
        assert c.greeting == ["421 4.7.1 busy"]
        assert c.closed()


def test_connect_2xx_replaces_the_greeting_text(tmp_path):
    _stage_refuser(tmp_path, "p_conn2", "connect", (220, "welcome, friend"))
    with _smtpd(tmp_path, "p_conn2:check") as srv:
        assert srv.client().greeting == ["220 welcome, friend"]


def test_helo_refusal_leaves_the_session_without_helo(tmp_path):
    _stage_refuser(tmp_path, "p_helo", "helo", (550, "5.7.1", "bad helo"))
    with _smtpd(tmp_path, "p_helo:check") as srv:
        c = srv.client()
        assert c.cmd("EHLO client.test") == ["550 5.7.1 bad helo"]
        assert c.cmd("MAIL FROM:<a@b.test>")[0].startswith("503")


def test_mail_refusal_leaves_no_transaction(tmp_path):
    _stage_refuser(tmp_path, "p_mail", "mail", (550, "5.7.1", "not you"))
    with _smtpd(tmp_path, "p_mail:check") as srv:
        c = srv.client()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@b.test>") == ["550 5.7.1 not you"]
        assert c.cmd("RCPT TO:<u@example.org>")[0].startswith("503")


def test_rcpt_refusal_is_logged_in_the_spec_form_and_counted(tmp_path, caplog):
    _stage_refuser(tmp_path, "p_rcpt", "rcpt", (550, "5.7.1", "not them"))
    with caplog.at_level(logging.INFO):
        with _smtpd(tmp_path, "p_rcpt:check") as srv:
            metrics = srv.runtime.metrics = Metrics()
            assert _until_rcpt(srv.client()) == ["550 5.7.1 not them"]
    assert ("reject: RCPT from [127.0.0.1]: 550 5.7.1 not them; from=<s@sender.test> to=<u@example.org> "
            "helo=<client.test>") in caplog.text
    assert metrics.registry.get_sample_value("pmaster_smtpd_rejections_total",
                                             {"listener": "test", "reason": "policy"}) == 1


def test_rcpt_2xx_accepts_with_its_text(tmp_path):
    _stage_refuser(tmp_path, "p_rcpt2", "rcpt", (250, "fine by me"))
    with _smtpd(tmp_path, "p_rcpt2:check") as srv:
        assert _until_rcpt(srv.client()) == ["250 2.0.0 fine by me"]


def test_data_stage_sees_the_headers_and_refuses_after_the_final_dot(tmp_path):
    _module(tmp_path, "p_data", """\
        def check(stage, session):
            if stage == "data" and "spam" in (session.headers["Subject"] or ""):
                return (554, "5.7.1", "no spam, %d octets, id %s" % (session.size, session.queue_id))
        """)
    with _smtpd(tmp_path, "p_data:check") as srv:
        c = srv.client()
        _until_rcpt(c)
        c.cmd("DATA")
        c.send(b"Subject: buy spam\r\n\r\nbody\r\n.\r\n")
        reply = c.reply()
        assert reply[0].startswith("554 5.7.1 no spam, ")
        assert srv.queue_ids() == []
        c.cmd("MAIL FROM:<s@sender.test>")
        c.cmd("RCPT TO:<u@example.org>")
        c.cmd("DATA")
        c.send(b"Subject: hello\r\n\r\nbody\r\n.\r\n")
        assert c.reply()[0].startswith("250")
        assert len(srv.queue_ids()) == 1


def test_the_view_offers_every_attribute_of_spec_9(tmp_path):
    _module(tmp_path, "p_view", """\
        SEEN = []
        def check(stage, session):
            SEEN.append((stage, session.listener, session.client_address, session.client_port, session.client_name,
                         session.helo, session.tls, session.mail_from, session.recipients, session.recipient,
                         session.size, session.queue_id,
                         None if session.headers is None else session.headers["Subject"]))
        """)
    with _smtpd(tmp_path, "p_view:check") as srv:
        c = srv.client()
        _until_rcpt(c)
        c.cmd("DATA")
        c.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        c.reply()
        import sys
        seen = {s[0]: s for s in sys.modules["p_view"].SEEN}
        qid = srv.queue_ids()[0]
    assert set(seen) == {"connect", "helo", "mail", "rcpt", "data"}
    assert seen["connect"][1:3] == ("test", "127.0.0.1") and isinstance(seen["connect"][3], int)
    assert seen["connect"][5] is None and seen["helo"][5] == "client.test"
    assert seen["mail"][7:11] == ("s@sender.test", (), None, 77)
    assert seen["rcpt"][8:10] == ((), "u@example.org")
    assert seen["data"][8] == ("u@example.org",) and seen["data"][9] is None
    assert seen["data"][11] == qid and seen["data"][12] == "hi" and seen["data"][10] > 0
    assert seen["rcpt"][6] is None and seen["rcpt"][11] is None


def test_the_view_is_read_only(tmp_path):
    _module(tmp_path, "p_ro", """\
        def check(stage, session):
            if stage == "mail":
                session.mail_from = "forged@x.test"
        """)
    with _smtpd(tmp_path, "p_ro:check") as srv:
        c = srv.client()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@b.test>")[0].startswith("451 4.3.0")


def test_an_exception_answers_451_4_3_0_with_the_traceback_only_in_the_log(tmp_path, caplog):
    _module(tmp_path, "p_raise", """\
        def check(stage, session):
            if stage == "rcpt":
                raise ValueError("secret internals")
        """)
    with caplog.at_level(logging.ERROR):
        with _smtpd(tmp_path, "p_raise:check") as srv:
            c = srv.client()
            reply = _until_rcpt(c)
            assert reply[0].startswith("451 4.3.0") and "secret" not in reply[0]
            assert c.cmd("NOOP")[0].startswith("250")  # the session goes on
    assert "ValueError: secret internals" in caplog.text and "Traceback" in caplog.text


@pytest.mark.parametrize("answer", ["'nonsense'", "(299, 'x')", "(600, 'x')", "(354, 'x')", "('550', 'x')",
                                    "(550, '4.1.1', 'x')", "(550, 'x.y.z', 'x')", "(550, 5, 'x')", "(550,)",
                                    "(550, 'a', 'b', 'c')", "(550, 'bad\\r\\ninjection')", "[550, 'x']",
                                    "(True, 'x')"])
def test_a_reply_that_is_not_a_reply_answers_451_4_3_5_and_is_logged(tmp_path, caplog, answer):
    _module(tmp_path, "p_bad", "def check(stage, session):\n    return %s if stage == 'rcpt' else None\n" % answer)
    with caplog.at_level(logging.ERROR):
        with _smtpd(tmp_path, "p_bad:check") as srv:
            assert _until_rcpt(srv.client())[0].startswith("451 4.3.5")
    assert "p_bad:check returned" in caplog.text


@pytest.mark.parametrize("answer, expected", [
    ("(550, 'no')", "550 5.7.1 no"),
    ("(550, '5.1.1 no such user')", "550 5.1.1 no such user"),
    ("(450, '4.2.0', 'later')", "450 4.2.0 later"),
    ("(421, 'bye')", "421 4.7.1 bye"),
])
def test_a_reply_gets_an_enhanced_code_when_it_has_none(tmp_path, answer, expected):
    _module(tmp_path, "p_code", "def check(stage, session):\n    return %s if stage == 'rcpt' else None\n" % answer)
    with _smtpd(tmp_path, "p_code:check") as srv:
        assert _until_rcpt(srv.client()) == [expected]


def test_several_policies_run_in_order_and_the_first_refusal_answers(tmp_path):
    _stage_refuser(tmp_path, "p_first", "rcpt", (550, "5.7.1", "first"))
    _stage_refuser(tmp_path, "p_second", "rcpt", (550, "5.7.1", "second"))
    with _smtpd(tmp_path, "p_second:check", "p_first:check") as srv:
        assert _until_rcpt(srv.client()) == ["550 5.7.1 second"]


def test_the_configuration_directory_comes_before_sys_path(tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "p_shadow.py").write_text("def check(stage, session):\n    return (550, 'from sys.path')"
                                       " if stage == 'rcpt' else None\n")
    monkeypatch.syspath_prepend(str(other))
    _stage_refuser(tmp_path, "p_shadow", "rcpt", (550, "5.7.1", "from the config dir"))
    with _smtpd(tmp_path, "p_shadow:check") as srv:
        assert _until_rcpt(srv.client()) == ["550 5.7.1 from the config dir"]


def test_a_module_on_sys_path_is_found(tmp_path, monkeypatch):
    other = tmp_path / "lib"
    other.mkdir()
    (other / "p_syspath.py").write_text("def check(stage, session):\n    return (550, 'lib') "
                                        "if stage == 'rcpt' else None\n")
    monkeypatch.syspath_prepend(str(other))
    conf = tmp_path / "conf"
    conf.mkdir()
    with _smtpd(conf, "p_syspath:check") as srv:
        assert _until_rcpt(srv.client()) == ["550 5.7.1 lib"]


def test_a_missing_function_is_a_build_error(tmp_path):
    _module(tmp_path, "p_nofn", "def other(stage, session):\n    return None\n")
    with pytest.raises(PmasterError, match="p_nofn.*no function 'check'"):
        with _smtpd(tmp_path, "p_nofn:check"):
            pass


def test_pmaster_run_refuses_to_start_naming_file_and_line(tmp_path):
    _module(tmp_path, "p_broken", "def check(stage, session):\n    return None\n")
    text = CONFIG.replace("{policies}", "policy = p_broken:nope")
    daemon = DaemonProcess(tmp_path, text, wait_port=False)
    with pytest.raises(RuntimeError) as info:
        daemon.start(timeout=15)
    assert "pmaster.cf:8:12: error: policy p_broken:nope: module p_broken" in str(info.value)
    assert "has no function 'nope'" in str(info.value)


def test_pmaster_check_only_warns_about_a_module_it_cannot_import(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "pmaster.cf"
    path.write_text(CONFIG.replace("{policies}", "policy = p_absent:check").replace("{spool}", str(tmp_path))
                    .replace("{tmp}", str(tmp_path)).replace("{port}", "2525"))
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "pmaster", "check", "-c", str(path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert out.returncode == 0, out.stdout
    assert b"8:12: warning: policy p_absent:check: no module named 'p_absent'" in out.stdout


def test_sighup_imports_the_module_again(tmp_path):
    _stage_refuser(tmp_path, "p_reload", "rcpt", (550, "5.7.1", "version one"))
    daemon = DaemonProcess(tmp_path, CONFIG.replace("{policies}", "policy = p_reload:check")).start()
    try:
        with daemon.client() as c:
            assert _until_rcpt(c) == ["550 5.7.1 version one"]
        _stage_refuser(tmp_path, "p_reload", "rcpt", (550, "5.7.1", "version two"))
        shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)  # same size and second: no stale .pyc
        daemon.reload()
        wait_until(lambda: daemon.log_text().count("configuration reloaded") >= 1, what="the reload")
        with daemon.client() as c:
            assert _until_rcpt(c) == ["550 5.7.1 version two"]
    finally:
        daemon.stop()


# -- contrib/policy

CONTRIB = os.path.join(REPO, "contrib", "policy")


def _contrib(tmp_path, name):
    shutil.copy(os.path.join(CONTRIB, name + ".py"), tmp_path / (name + ".py"))


def _client_from(srv, source):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((srv.host, srv.port))
    f = sock.makefile("rb")
    greeting = f.readline().decode().rstrip("\r\n")
    sock.close()
    return greeting


def test_contrib_allowlist_lets_listed_networks_in_and_refuses_others(tmp_path):
    _contrib(tmp_path, "allowlist")
    (tmp_path / "allowlist.networks").write_text("# test\n127.0.0.1/32\n")
    with _smtpd(tmp_path, "allowlist:check") as srv:
        assert _client_from(srv, "127.0.0.1").startswith("220 ")
        assert _client_from(srv, "127.0.0.2") == "554 5.7.1 Access denied: client [127.0.0.2] is not allowed here"


def test_contrib_allowlist_without_a_list_allows_loopback_only(tmp_path):
    _contrib(tmp_path, "allowlist")
    with _smtpd(tmp_path, "allowlist:check") as srv:
        assert _client_from(srv, "127.0.0.2").startswith("220 ")
        import sys
        assert not sys.modules["allowlist"].allowed("192.0.2.1")


def test_contrib_rcptcap_caps_recipients_per_sender(tmp_path, monkeypatch):
    monkeypatch.setenv("PMASTER_RCPTCAP_LIMIT", "2")
    _contrib(tmp_path, "rcptcap")
    with _smtpd(tmp_path, "rcptcap:check") as srv:
        c = srv.client()
        assert _until_rcpt(c, "a@example.org")[0].startswith("250")
        assert c.cmd("RCPT TO:<b@example.org>")[0].startswith("250")
        assert c.cmd("RCPT TO:<c@example.org>") == [
            "452 4.5.3 Too many recipients for <s@sender.test>; try the rest later"]
        c.cmd("RSET")
        assert c.cmd("MAIL FROM:<s@sender.test>")[0].startswith("250")
        assert c.cmd("RCPT TO:<d@example.org>")[0].startswith("452 4.5.3")  # across transactions
        c.cmd("RSET")
        assert c.cmd("MAIL FROM:<other@sender.test>")[0].startswith("250")
        assert c.cmd("RCPT TO:<d@example.org>")[0].startswith("250")
        c.cmd("RSET")
        assert c.cmd("MAIL FROM:<>")[0].startswith("250")
        for rcpt in ("e", "f", "g"):
            assert c.cmd("RCPT TO:<%s@example.org>" % rcpt)[0].startswith("250")  # bounces are not capped


def test_sighup_with_a_broken_module_keeps_the_running_policy(tmp_path):
    _stage_refuser(tmp_path, "p_keep", "rcpt", (550, "5.7.1", "still here"))
    daemon = DaemonProcess(tmp_path, CONFIG.replace("{policies}", "policy = p_keep:check")).start()
    try:
        (tmp_path / "p_keep.py").write_text("def check(stage, session)\n")  # a syntax error
        shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
        daemon.reload()
        wait_until(lambda: "reload failed" in daemon.log_text(), what="the refused reload")
        assert "policy p_keep:check: cannot import p_keep" in daemon.log_text()
        with daemon.client() as c:
            assert _until_rcpt(c) == ["550 5.7.1 still here"]
    finally:
        daemon.stop()
