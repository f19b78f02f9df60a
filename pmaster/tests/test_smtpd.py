"""SMTP session behaviour over real sockets, against an in-process listener (SPEC 4 and 9, issue 3)."""

import os
import shutil
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from pmaster.tests.daemon_fixture import InProcessSmtpd, RawClient, wait_for

CONFIG = """\
[core]
  hostname = {hostname}
  spool-directory = {spool}
  pid-file = {tmp}/run/pmaster.pid
  min-free-space = {min_free}

[smtpd test]
  name = mx.test
  listen-port = 127.0.0.1:{port}
  max-recipients = 5
  max-message-size = 64k
  timeout = {timeout}
{smtpd}

[route]
  joe@example.org  pipe(cat >/dev/null)
  @example.org     relay(192.0.2.1)
"""

LOCAL_CONFIG = """\
[core]
  hostname = {hostname}
  spool-directory = {spool}
  pid-file = {tmp}/run/pmaster.pid
  min-free-space = 1k

[smtpd local]
  name = local.test
  listen-port = 127.0.0.1:{port}
  local-rcpt-to = yes

[route]
  @example.org  pipe(cat >/dev/null)
"""


def serve(tmp_path, smtpd: str = "", timeout: str = "10s", min_free: str = "1k", config: str = CONFIG):
    return InProcessSmtpd(tmp_path, config, values={"smtpd": smtpd, "timeout": timeout, "min_free": min_free})


@pytest.fixture
def server(tmp_path):
    with serve(tmp_path) as srv:
        yield srv


@pytest.fixture
def local_server(tmp_path):
    with serve(tmp_path, config=LOCAL_CONFIG) as srv:
        yield srv


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def code(reply) -> str:
    """'250 2.1.0' style: the code and the enhanced code of the last line."""
    return " ".join(reply[-1].split()[:2])


def ehlo(c: RawClient, name: str = "client.test"):
    reply = c.cmd("EHLO %s" % name)
    assert reply[-1].startswith("250 ")
    return reply


def start_mail(c: RawClient, rcpts=("joe@example.org",), sender: str = "alice@sender.test"):
    ehlo(c)
    assert code(c.cmd("MAIL FROM:<%s>" % sender)) == "250 2.1.0"
    for r in rcpts:
        assert code(c.cmd("RCPT TO:<%s>" % r)) == "250 2.1.5"


def send_data(c: RawClient, body: bytes):
    """DATA, then ``body`` exactly as given (it must end with the final dot); returns the final reply."""
    assert c.cmd("DATA")[-1].startswith("354 ")
    c.send(body)
    return c.reply()


def qid_of(reply) -> str:
    assert code(reply) == "250 2.0.0", reply
    return reply[-1].split()[-1]


MESSAGE = b"Subject: hi\r\nMessage-ID: <m1@sender.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nhello\r\n.\r\n"


# ----- greeting, EHLO and the simple verbs


def test_greeting_names_the_listener_without_enhanced_code(client):
    assert client.greeting == ["220 mx.test ESMTP Postmaster"]


def test_ehlo_advertises_extensions_without_enhanced_codes(client):
    reply = client.cmd("EHLO client.test")
    assert reply[0] == "250-mx.test"
    keywords = [line[4:] for line in reply[1:]]
    assert set(keywords) == {"PIPELINING", "8BITMIME", "SIZE 65536", "ENHANCEDSTATUSCODES"}
    assert "STARTTLS" not in keywords  # no certificate configured


def test_helo_answers_the_listener_name(client):
    assert client.cmd("HELO client.test") == ["250 mx.test"]


@pytest.mark.parametrize("line, expected", [
    ("NOOP", "250 2.0.0"), ("NOOP anything", "250 2.0.0"), ("RSET", "250 2.0.0"),
    ("VRFY joe@example.org", "252 2.5.2"), ("VRFY root", "252 2.5.2"),
])
def test_simple_verbs_answer_with_enhanced_codes(client, line, expected):
    assert code(client.cmd(line)) == expected


def test_quit_answers_221_and_closes(client):
    assert code(client.cmd("QUIT")) == "221 2.0.0"
    assert client.closed()


@pytest.mark.parametrize("line", ["HELP", "HELP DATA", "TURN", "SEND FROM:<a@b>", "SOML FROM:<a@b>",
                                  "SAML FROM:<a@b>", "EXPN staff", "EXPN", "help"])
def test_unimplemented_verbs_answer_502_5_5_1(client, line):
    assert code(client.cmd(line)) == "502 5.5.1"


@pytest.mark.parametrize("line", ["XYZZY", "BDAT 10 LAST", "MAILFROM:<a@b>", "\x01\x02", "AUTH PLAIN AAAA"])
def test_unknown_verbs_answer_500_5_5_2(client, line):
    assert code(client.cmd(line)) == "500 5.5.2"


@pytest.mark.parametrize("line, expected", [
    ("HELO", "501 5.5.4"), ("EHLO", "501 5.5.4"), ("VRFY", "501 5.5.4"), ("DATA now", "501 5.5.4"),
    ("MAIL TO:<a@b.test>", "501 5.5.4"), ("MAIL FROM:<a@b.test> SIZE=big", "501 5.5.4"),
    ("MAIL FROM:<a@b.test> BODY=BINARYMIME", "501 5.5.4"), ("MAIL FROM:<a b@c>", "501 5.1.7"),
    ("MAIL FROM:<a@bad..domain>", "501 5.1.7"),
])
def test_bad_arguments_answer_501(client, line, expected):
    ehlo(client)
    assert code(client.cmd(line)) == expected


def test_bad_recipient_syntax_answers_501_5_1_3(client):
    start_mail(client, rcpts=())
    assert code(client.cmd("RCPT TO:<joe@[999.1.1.1]>")) == "501 5.1.3"
    assert code(client.cmd("RCPT TO:<>")) == "501 5.1.3"


def test_commands_out_of_order_answer_503_5_5_1(client):
    assert code(client.cmd("MAIL FROM:<a@sender.test>")) == "503 5.5.1"  # before HELO
    ehlo(client)
    assert code(client.cmd("RCPT TO:<joe@example.org>")) == "503 5.5.1"  # before MAIL
    assert code(client.cmd("DATA")) == "503 5.5.1"
    assert code(client.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0"
    assert code(client.cmd("MAIL FROM:<a@sender.test>")) == "503 5.5.1"  # nested
    assert code(client.cmd("DATA")) == "503 5.5.1"  # no recipient yet


def test_rset_forgets_the_transaction(client):
    start_mail(client)
    assert code(client.cmd("RSET")) == "250 2.0.0"
    assert code(client.cmd("DATA")) == "503 5.5.1"
    assert code(client.cmd("MAIL FROM:<b@sender.test>")) == "250 2.1.0"


# ----- MAIL parameters


def test_mail_accepts_size_and_8bitmime_and_records_body_type(server, client):
    ehlo(client)
    assert code(client.cmd("MAIL FROM:<a@sender.test> SIZE=1000 BODY=8BITMIME")) == "250 2.1.0"
    assert code(client.cmd("RCPT TO:<joe@example.org>")) == "250 2.1.5"
    qid = qid_of(send_data(client, b"Subject: caf\xc3\xa9\r\n\r\ncaf\xc3\xa9\r\n.\r\n"))
    assert server.envelope(qid)["body_type"] == "8BITMIME"
    assert b"caf\xc3\xa9\r\n" in server.body(qid)


def test_mail_accepts_body_7bit(client):
    ehlo(client)
    assert code(client.cmd("MAIL FROM:<a@sender.test> BODY=7BIT")) == "250 2.1.0"


def test_mail_size_over_the_limit_answers_552_5_3_4(client):
    ehlo(client)
    assert code(client.cmd("MAIL FROM:<a@sender.test> SIZE=%d" % (65 * 1024))) == "552 5.3.4"


def test_mail_with_space_after_colon_is_tolerated(client):
    ehlo(client)
    assert code(client.cmd("MAIL FROM: <x@y.test>")) == "250 2.1.0"


def test_null_sender_is_accepted_and_stored_empty(server, client):
    start_mail(client, sender="")
    qid = qid_of(send_data(client, MESSAGE))
    assert server.envelope(qid)["sender"] == ""


def test_sender_with_leading_dash_answers_553_5_1_7(client):
    ehlo(client)
    assert code(client.cmd("MAIL FROM:<-oQ/tmp/x@sender.test>")) == "553 5.1.7"


def test_free_space_below_min_free_space_answers_452_4_3_1(tmp_path):
    with serve(tmp_path, min_free="1000000G") as srv, srv.client() as c:
        ehlo(c)
        assert code(c.cmd("MAIL FROM:<a@sender.test>")) == "452 4.3.1"
        assert code(c.cmd("NOOP")) == "250 2.0.0"


# ----- RCPT and routing


def test_recipient_without_route_answers_550_5_1_1(client):
    start_mail(client, rcpts=())
    reply = client.cmd("RCPT TO:<someone@nowhere.test>")
    assert code(reply) == "550 5.1.1"
    assert "someone@nowhere.test" in reply[-1]


def test_recipient_with_leading_dash_answers_553_5_1_3(client):
    start_mail(client, rcpts=())
    assert code(client.cmd("RCPT TO:<-joe@example.org>")) == "553 5.1.3"


def test_recipient_extension_with_leading_dash_answers_553_5_1_3(tmp_path):
    config = CONFIG.replace("  min-free-space = {min_free}", "  min-free-space = {min_free}\n  recipient-delimiter = +")
    with serve(tmp_path, config=config) as srv, srv.client() as c:
        start_mail(c, rcpts=())
        assert code(c.cmd("RCPT TO:<joe+-oops@example.org>")) == "553 5.1.3"
        assert code(c.cmd("RCPT TO:<joe+news@example.org>")) == "250 2.1.5"


def test_recipient_domain_label_with_leading_dash_answers_501(client):
    start_mail(client, rcpts=())
    assert code(client.cmd("RCPT TO:<joe@-oq>")) == "501 5.1.3"


def test_recipient_domain_case_and_trailing_dot_match_the_routing_key(server, client):
    start_mail(client, rcpts=("Joe@EXAMPLE.org.",))
    qid = qid_of(send_data(client, MESSAGE))
    (rcpt,) = server.envelope(qid)["recipients"]
    assert rcpt["original"] == "Joe@example.org"  # local part keeps its case
    assert rcpt["target"] == "pipe(cat >/dev/null)"  # the key joe@example.org, not @example.org


def test_quoted_local_part_is_kept(server, client):
    start_mail(client, rcpts=('"john doe"@example.org',))
    qid = qid_of(send_data(client, MESSAGE))
    (rcpt,) = server.envelope(qid)["recipients"]
    assert rcpt["address"] == '"john doe"@example.org'
    assert rcpt["target"] == "relay(192.0.2.1)"


def test_source_route_is_accepted_and_ignored(server, client):
    start_mail(client, rcpts=())
    assert code(client.cmd("RCPT TO:<@relay1.test,@relay2.test:joe@example.org>")) == "250 2.1.5"
    qid = qid_of(send_data(client, MESSAGE))
    assert server.envelope(qid)["recipients"][0]["original"] == "joe@example.org"


@pytest.mark.parametrize("rcpt", ["postmaster", "Postmaster", "postmaster@mx.test", "POSTMASTER@MX.TEST",
                                  "postmaster@localhost"])
def test_postmaster_is_always_accepted(client, rcpt):
    start_mail(client, rcpts=())
    assert code(client.cmd("RCPT TO:<%s>" % rcpt)) == "250 2.1.5"


def test_bare_name_is_refused_without_local_rcpt_to(client):
    start_mail(client, rcpts=())
    assert code(client.cmd("RCPT TO:<root>")) == "504 5.5.2"


def test_too_many_recipients_answers_452_4_5_3(server, client):
    start_mail(client, rcpts=["r%d@example.org" % i for i in range(5)])
    assert code(client.cmd("RCPT TO:<r6@example.org>")) == "452 4.5.3"
    qid = qid_of(send_data(client, MESSAGE))
    assert len(server.envelope(qid)["recipients"]) == 5


# ----- pipelining


def test_pipelined_batch_gets_replies_in_order_flushed_together(client):
    ehlo(client)
    batch = (b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<joe@example.org>\r\nRCPT TO:<nobody@nowhere.test>\r\n"
             b"RCPT TO:<bob@example.org>\r\nDATA\r\n")
    client.send(batch)
    client.sock.settimeout(5)
    first = client.sock.recv(65536)  # the first segment that arrives
    client.sock.settimeout(0.2)
    try:
        rest = client.sock.recv(65536)
    except socket.timeout:
        rest = b""
    assert rest == b"", "replies of one batch came in more than one segment"
    lines = first.decode().split("\r\n")[:-1]
    assert [" ".join(x.split()[:2]) if not x.startswith("354") else "354" for x in lines] == [
        "250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5", "354"]


def test_pipelined_message_and_quit_in_one_write(server, client):
    ehlo(client)
    client.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<joe@example.org>\r\nDATA\r\n")
    assert [code(client.reply()) for _ in range(2)] == ["250 2.1.0", "250 2.1.5"]
    assert client.reply()[0].startswith("354")
    client.send(MESSAGE + b"QUIT\r\n")
    qid = qid_of(client.reply())
    assert code(client.reply()) == "221 2.0.0"
    assert server.queue_ids() == [qid]


# ----- DATA


def test_message_is_spooled_with_envelope_and_queue_id(server, client):
    start_mail(client, rcpts=("joe@example.org", "bob@example.org"))
    before = time.time()
    qid = qid_of(send_data(client, MESSAGE))
    assert server.queue_ids() == [qid]
    assert server.notified == [qid]
    env = server.envelope(qid)
    assert env["queue_id"] == qid
    assert env["sender"] == "alice@sender.test"
    assert env["helo"] == "client.test"
    assert env["client_address"] == "127.0.0.1"
    assert env["listener"] == "test"
    assert env["tls"] is None
    assert before - 1 <= env["arrival"] <= time.time() + 1
    assert [(r["address"], r["mailer"], r["target"], r["state"]) for r in env["recipients"]] == [
        ("joe@example.org", "pipe", "pipe(cat >/dev/null)", "pending"),
        ("bob@example.org", "relay", "relay(192.0.2.1)", "pending")]
    assert server.spool_files("tmp") == []


def test_received_header_is_prepended(server, client):
    start_mail(client)
    qid = qid_of(send_data(client, MESSAGE))
    body = server.body(qid)
    assert body.startswith(b"Received: from client.test (")
    header = body.split(b"\r\nSubject:")[0].decode()
    assert "[127.0.0.1]" in header
    assert "by mx.test" in header
    assert "with ESMTP id %s" % qid in header
    assert "for <joe@example.org>;" in header
    assert body.endswith(b"\r\n\r\nhello\r\n")


def test_helo_session_is_recorded_as_smtp(server, client):
    client.cmd("HELO old.client.test")
    client.cmd("MAIL FROM:<a@sender.test>")
    client.cmd("RCPT TO:<joe@example.org>")
    qid = qid_of(send_data(client, MESSAGE))
    assert b"with SMTP id" in server.body(qid)


def test_dot_stuffed_lines_are_unstuffed(server, client):
    start_mail(client)
    qid = qid_of(send_data(client, b"Subject: dots\r\n\r\n..leading dot\r\n...\r\n.\r\n"))
    assert server.body(qid).endswith(b"\r\n\r\n.leading dot\r\n..\r\n")


def test_bare_lf_dot_does_not_end_data_and_smuggles_no_second_message(server, client):
    start_mail(client)
    smuggled = (b"Subject: smuggle\r\n\r\nfirst\n.\r\nMAIL FROM:<evil@attacker.test>\r\n"
                b"RCPT TO:<joe@example.org>\r\nDATA\r\nsmuggled text\r\n.\r\n")
    assert client.cmd("DATA")[0].startswith("354")
    client.send(smuggled + b"NOOP\r\n")
    qid = qid_of(client.reply())
    assert code(client.reply()) == "250 2.0.0"  # the NOOP: nothing else was answered
    assert server.queue_ids() == [qid]
    body = server.body(qid)
    assert b"MAIL FROM:<evil@attacker.test>" in body and b"smuggled text" in body


@pytest.mark.parametrize("ending", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"])
def test_only_crlf_dot_crlf_ends_data(server, client, ending):
    start_mail(client)
    assert client.cmd("DATA")[0].startswith("354")
    client.send(b"Subject: x\r\n\r\nbody" + ending + b"tail\r\n.\r\n")
    qid = qid_of(client.reply())
    assert b"tail\r\n" in server.body(qid)


def test_bare_newline_is_normalized_by_default(server, client):
    start_mail(client)
    qid = qid_of(send_data(client, b"Subject: lf\n\nline one\nline two\r\n.\r\n"))
    assert server.body(qid).endswith(b"Subject: lf\r\n\r\nline one\r\nline two\r\n")


def test_bare_newline_reject_answers_550_5_5_2(tmp_path):
    with serve(tmp_path, smtpd="  bare-newline = reject") as srv, srv.client() as c:
        start_mail(c)
        assert code(send_data(c, b"Subject: lf\r\n\r\nbare\nnewline\r\n.\r\n")) == "550 5.5.2"
        assert srv.queue_ids() == []
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<joe@example.org>")
        qid_of(send_data(c, MESSAGE))


def test_message_over_max_size_answers_552_and_session_goes_on(server, client):
    start_mail(client)
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 70 + b".\r\n"
    assert code(send_data(client, big)) == "552 5.3.4"
    assert server.queue_ids() == []
    assert code(client.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0"
    assert code(client.cmd("RCPT TO:<joe@example.org>")) == "250 2.1.5"
    qid = qid_of(send_data(client, MESSAGE))
    assert server.queue_ids() == [qid]
    assert wait_for(lambda: server.spool_files("tmp") == [], 2)


@pytest.mark.parametrize("count, expected", [(50, "250 2.0.0"), (51, "554 5.4.6")])
def test_more_than_50_received_headers_answer_554_5_4_6(server, client, count, expected):
    start_mail(client)
    hops = b"".join(b"Received: from hop%d.test by hop%d.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i)
                    for i in range(count))
    assert code(send_data(client, hops + b"Subject: loop\r\n\r\nbody\r\n.\r\n")) == expected


def test_long_text_lines_in_data_are_not_limited(server, client):
    start_mail(client)
    qid = qid_of(send_data(client, b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n"))
    assert b"y" * 5000 + b"\r\n" in server.body(qid)


def test_session_dying_mid_data_leaves_nothing_in_the_spool(server, client):
    start_mail(client)
    assert client.cmd("DATA")[0].startswith("354")
    client.send(b"Subject: cut\r\n\r\n" + b"partial line\r\n" * 1000)
    time.sleep(0.2)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()  # with linger 0: a reset
    assert wait_for(lambda: server.runtime.active_sessions() == 0, 5)
    assert server.spool_files("queue") == []
    assert server.spool_files("tmp") == []


def test_spool_that_cannot_take_a_file_answers_data_452_4_3_1(server, client):
    start_mail(client)
    tmp_dir = os.path.join(server.spool_dir, "tmp")
    shutil.rmtree(tmp_dir)
    with open(tmp_dir, "w"):
        pass  # a file where the directory should be: even root cannot create files in it
    assert code(client.cmd("DATA")) == "452 4.3.1"
    assert code(client.cmd("NOOP")) == "250 2.0.0"
    assert code(client.cmd("DATA")) == "503 5.5.1"  # the transaction is gone
    assert server.spool_files("queue") == []


# ----- limits and robustness


def test_command_line_over_2048_octets_answers_500_5_5_2_and_session_goes_on(client):
    client.send(b"NOOP " + b"a" * (2049 - 7) + b"\r\n")  # 2049 octets with the CRLF
    assert code(client.reply()) == "500 5.5.2"
    client.send(b"NOOP " + b"a" * (2048 - 7) + b"\r\n")  # exactly 2048: fine
    assert code(client.reply()) == "250 2.0.0"
    client.send(b"NOOP " + b"b" * 100000 + b"\r\nNOOP\r\n")
    assert code(client.reply()) == "500 5.5.2"
    assert code(client.reply()) == "250 2.0.0"


def test_idle_client_gets_421_after_the_command_timeout(tmp_path):
    with serve(tmp_path, timeout="2s") as srv, srv.client() as c:
        ehlo(c)
        start = time.monotonic()
        reply = c.reply()
        assert reply[-1].startswith("421 4.4.2")
        assert 1.5 < time.monotonic() - start < 6
        assert c.closed()


def test_client_stalling_in_data_gets_421_and_nothing_is_stored(tmp_path):
    with serve(tmp_path, timeout="2s") as srv, srv.client() as c:
        start_mail(c)
        assert c.cmd("DATA")[0].startswith("354")
        c.send(b"Subject: slow\r\n\r\nsome")
        assert c.reply()[-1].startswith("421")
        assert wait_for(lambda: srv.runtime.active_sessions() == 0, 5)
        assert srv.spool_files("tmp") == [] and srv.spool_files("queue") == []


def test_ten_errors_then_421(client):
    for _ in range(9):
        assert code(client.cmd("BOGUS")) == "500 5.5.2"
    client.send(b"BOGUS\r\n")
    assert code(client.reply()) == "500 5.5.2"
    assert client.reply()[-1].startswith("421 4.7.0")
    assert client.closed()


def test_max_connections_answers_421_4_7_0(tmp_path):
    with serve(tmp_path, smtpd="  max-connections = 2") as srv:
        with srv.client() as a, srv.client() as b:
            with srv.client(greeting=False) as c:
                assert c.reply()[-1].startswith("421 4.7.0")
                assert c.closed()
            assert code(a.cmd("NOOP")) == "250 2.0.0"
            assert code(b.cmd("NOOP")) == "250 2.0.0"
        assert wait_for(lambda: srv.runtime.active_sessions() == 0, 5)
        with srv.client() as d:
            assert code(d.cmd("NOOP")) == "250 2.0.0"


def test_max_connections_per_ip_answers_421_4_7_0(tmp_path):
    # 127.0.0.1 is a trusted network by default, and trusted clients skip the per-IP limit (SPEC 2).
    untrusted = CONFIG.replace("  min-free-space = {min_free}\n",
                               "  min-free-space = {min_free}\n  trusted-networks = 192.0.2.0/24\n")
    with serve(tmp_path, smtpd="  max-connections-per-ip = 1", config=untrusted) as srv:
        with srv.client() as a:
            with srv.client(greeting=False) as b:
                reply = b.reply()
                assert reply[-1].startswith("421 4.7.0") and "127.0.0.1" in reply[-1]
            assert code(a.cmd("NOOP")) == "250 2.0.0"


def test_hundred_idle_connections_do_not_stop_a_new_client(tmp_path):
    with serve(tmp_path, smtpd="  max-connections-per-ip = 200") as srv:
        idle = []
        try:
            for _ in range(100):
                s = socket.create_connection((srv.host, srv.port), timeout=10)
                idle.append(s)
            with srv.client() as c:
                start_mail(c)
                qid_of(send_data(c, MESSAGE))
        finally:
            for s in idle:
                s.close()


def test_binary_junk_and_disconnect_do_not_kill_the_server(server):
    junk = bytes(range(256)) * 20
    for payload in (junk, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + junk, b"\r\n" * 50 + junk,
                    b"EHLO \xff\xfe\x00\r\nMAIL FROM:<\xc3\x28@x>\r\n"):
        s = socket.create_connection((server.host, server.port), timeout=10)
        s.sendall(payload)
        s.close()
    with server.client() as c:
        start_mail(c)
        qid_of(send_data(c, MESSAGE))


def test_concurrent_sessions_each_get_their_message(server):
    errors = []

    def one(i):
        try:
            with server.client() as c:
                start_mail(c)
                qid_of(send_data(c, b"Subject: %d\r\n\r\nbody\r\n.\r\n" % i))
        except Exception as exc:  # reported below: a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []
    assert len(server.queue_ids()) == 10


def test_session_threads_are_reused_for_later_connections(server):
    for i in range(5):
        with server.client() as c:
            assert code(c.cmd("QUIT")) == "221 2.0.0"
        assert wait_for(lambda: server.server.idle_threads == 2), "no thread waiting after session %d" % i
        if i == 0:
            threads = threading.active_count()
    assert threading.active_count() <= threads


def test_threads_waiting_in_accept_outlive_the_inherited_timeout(tmp_path):
    # The listening socket carries the command timeout for its sessions (SO_RCVTIMEO): accept() gives up
    # after it too, and the waiting threads must simply wait again.
    with serve(tmp_path, timeout="1s") as srv:
        time.sleep(2.5)
        with srv.client() as c:
            assert code(c.cmd("QUIT")) == "221 2.0.0"


def test_every_concurrent_connection_gets_a_session_at_once(server):
    clients = [server.client() for _ in range(8)]  # each one waits for its greeting: all sessions at once
    try:
        for c in clients:
            assert code(c.cmd("NOOP")) == "250 2.0.0"
    finally:
        for c in clients:
            c.close()


def test_idle_session_threads_end_when_the_listener_closes(server):
    with server.client() as c:
        assert code(c.cmd("QUIT")) == "221 2.0.0"
    assert wait_for(lambda: server.server.idle_threads == 2)
    threads = threading.active_count()
    server.server.shutdown()
    server.server.server_close()
    assert server.server.idle_threads == 0
    assert wait_for(lambda: threading.active_count() < threads)


# ----- local submission (local-rcpt-to listeners)


def test_local_rcpt_to_accepts_a_passwd_user_and_qualifies_it(local_server):
    with local_server.client() as c:
        start_mail(c, rcpts=("root",))
        qid = qid_of(send_data(c, MESSAGE))
    (rcpt,) = local_server.envelope(qid)["recipients"]
    assert rcpt["original"] == "root@mx.test"
    assert rcpt["address"] == "root"
    assert rcpt["mailer"] == "pipe"


def test_local_rcpt_to_refuses_an_unknown_bare_name(local_server):
    with local_server.client() as c:
        start_mail(c, rcpts=())
        assert code(c.cmd("RCPT TO:<no-such-user-xyzzy>")) == "550 5.1.1"


def test_local_submission_qualifies_an_unqualified_sender(local_server):
    with local_server.client() as c:
        start_mail(c, sender="alice")
        qid = qid_of(send_data(c, MESSAGE))
    assert local_server.envelope(qid)["sender"] == "alice@mx.test"


def test_local_submission_adds_message_id_and_date(local_server):
    with local_server.client() as c:
        start_mail(c, rcpts=("bob@example.org",))
        qid = qid_of(send_data(c, b"Subject: no ids\r\nFrom: alice\r\n\r\nbody\r\n.\r\n"))
    body = local_server.body(qid)
    head, _, rest = body.partition(b"\r\n\r\n")
    assert rest == b"body\r\n"
    lines = head.split(b"\r\n")
    message_ids = [x for x in lines if x.lower().startswith(b"message-id:")]
    dates = [x for x in lines if x.lower().startswith(b"date:")]
    assert len(message_ids) == 1 and message_ids[0].endswith(b"@mx.test>")
    assert qid.encode() in message_ids[0]
    assert len(dates) == 1
    assert b"Subject: no ids" in lines


def test_local_submission_keeps_existing_message_id_and_date(local_server):
    with local_server.client() as c:
        start_mail(c, rcpts=("bob@example.org",))
        qid = qid_of(send_data(c, MESSAGE))
    body = local_server.body(qid)
    assert body.count(b"Message-ID:") == 1 and b"Message-ID: <m1@sender.test>\r\n" in body
    assert body.count(b"Date:") == 1 and b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n" in body


def test_message_id_is_not_added_on_a_public_listener(server, client):
    start_mail(client)
    qid = qid_of(send_data(client, b"Subject: bare\r\n\r\nbody\r\n.\r\n"))
    assert b"Message-ID" not in server.body(qid)


# ----- real clients


def test_smtplib_sends_a_message(server):
    with server.smtp() as s:
        s.ehlo("py.test")
        assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("enhancedstatuscodes")
        refused = s.sendmail("a@sender.test", ["joe@example.org", "bob@example.org"],
                             b"Subject: smtplib\r\n\r\nhello\r\n.dot\r\n")
        assert refused == {}
    (qid,) = server.queue_ids()
    assert server.body(qid).endswith(b"hello\r\n.dot\r\n")
    assert len(server.envelope(qid)["recipients"]) == 2


def test_smtplib_sees_refused_recipient(server):
    with server.smtp() as s:
        refused = s.sendmail("a@sender.test", ["joe@example.org", "x@nowhere.test"], b"Subject: x\r\n\r\nbody\r\n")
    assert refused["x@nowhere.test"][0] == 550


def test_smtplib_all_recipients_refused_raises(server):
    with server.smtp() as s, pytest.raises(smtplib.SMTPRecipientsRefused):
        s.sendmail("a@sender.test", ["x@nowhere.test"], b"Subject: x\r\n\r\nbody\r\n")


def test_swaks_sends_a_pipelined_message(server):
    result = subprocess.run(["/usr/bin/swaks", "--server", "%s:%d" % (server.host, server.port), "--pipeline",
                             "--from", "alice@sender.test", "--to", "joe@example.org", "--helo", "swaks.test",
                             "--body", "from swaks"], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    (qid,) = server.queue_ids()
    assert b"from swaks" in server.body(qid)
    assert server.envelope(qid)["helo"] == "swaks.test"
