"""Line channel and TLS contexts over real socket pairs and real TLS (trustme certificates)."""

import hashlib
import re
import socket
import ssl
import struct
import threading
import time
import tracemalloc

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmaster import channel as channel_mod
from pmaster.channel import Channel, ChannelClosed, ChannelError, ChannelTimeout, LineTooLong
from pmaster.errors import PmasterError
from pmaster.tls import server_context, tls_description

# ----- helpers


class Peer:
    """Runs the client side of a test in a thread; join() re-raises what went wrong there."""

    def __init__(self, func, *args):
        self.error = None
        self.result = None
        self._thread = threading.Thread(target=self._run, args=(func,) + args, daemon=True)
        self._thread.start()

    def _run(self, func, *args):
        try:
            self.result = func(*args)
        except BaseException as exc:  # handed to the test thread by join()
            self.error = exc

    def join(self, timeout=20.0):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "peer thread hung"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def pair():
    """A server Channel and the raw client socket at the other end."""
    server, client = socket.socketpair()
    client.settimeout(20)
    ch = Channel(server, timeout=5)
    yield ch, client
    ch.close()
    client.close()


def send_in_pieces(sock, pieces, delay=0.03):
    for piece in pieces:
        sock.sendall(piece)
        time.sleep(delay)


def recv_until(sock, marker, limit=1 << 20):
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_body(ch, max_size=None, bare_newline="normalize"):
    stored = []
    result = ch.read_data(stored.append, max_size, bare_newline)
    return b"".join(stored), result


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def cert_files(ca, tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("localhost")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def server_ctx(cert_files):
    return server_context(*cert_files)


@pytest.fixture
def client_ctx(ca):
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def tls_pair(server_ctx, client_ctx, timeout=5):
    """Channel already upgraded to TLS, and the client's SSLSocket."""
    server, client = socket.socketpair()
    client.settimeout(20)
    ch = Channel(server, timeout=timeout)
    peer = Peer(lambda: client_ctx.wrap_socket(client, server_hostname="localhost"))
    ch.start_tls(server_ctx)
    return ch, peer.join()


# ----- readline


def test_readline_joins_a_line_split_across_packets(pair):
    ch, client = pair
    peer = Peer(send_in_pieces, client, [b"MAIL FR", b"OM:<a@b.ex", b"ample>\r", b"\nRSET\r\n"])
    assert ch.readline() == b"MAIL FROM:<a@b.example>\r\n"
    assert ch.readline() == b"RSET\r\n"
    peer.join()


def test_readline_accepts_a_bare_lf_line(pair):
    ch, client = pair
    client.sendall(b"NOOP\nQUIT\r\n")
    assert ch.readline() == b"NOOP\n"
    assert ch.readline() == b"QUIT\r\n"


def test_line_of_exactly_the_limit_is_accepted(pair):
    ch, client = pair
    line = b"N" * 2046 + b"\r\n"
    client.sendall(line)
    assert ch.readline(2048) == line


def test_long_line_raises_and_the_next_line_is_readable(pair):
    ch, client = pair
    client.sendall(b"X" * 2047 + b"\r\nQUIT\r\n")
    with pytest.raises(LineTooLong):
        ch.readline(2048)
    assert ch.readline(2048) == b"QUIT\r\n"


def test_long_line_arriving_slowly_is_discarded_up_to_its_lf(pair):
    ch, client = pair
    peer = Peer(send_in_pieces, client, [b"Y" * 3000, b"Y" * 70000, b"Y\r\nNOOP\r\n"])
    with pytest.raises(LineTooLong):
        ch.readline(2048)
    assert ch.readline(2048) == b"NOOP\r\n"
    peer.join()


def assert_readline_times_out_after_about(ch, seconds):
    start = time.monotonic()
    with pytest.raises(ChannelTimeout):
        ch.readline()
    assert seconds * 0.75 < time.monotonic() - start < 3


def test_readline_times_out():
    server, client = socket.socketpair()
    ch = Channel(server, timeout=0.2)
    assert_readline_times_out_after_about(ch, 0.2)
    ch.close()
    client.close()


def test_accepted_socket_inherits_the_listeners_timeouts_and_still_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    channel_mod.set_kernel_timeouts(listener, 0.2)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    usec = struct.unpack("@ll", server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    assert abs(usec[0] + usec[1] / 1e6 - 0.2) < 0.02  # Linux copies them at accept
    ch = Channel(server, timeout=0.2, preset=0.2)
    assert_readline_times_out_after_about(ch, 0.2)
    ch.close()
    client.close()
    listener.close()


def test_slow_drip_line_is_bounded_by_one_timeout():
    server, client = socket.socketpair()
    ch = Channel(server, timeout=0.5)
    stop = threading.Event()

    def drip():
        for _ in range(100):
            if stop.wait(0.05):
                return
            client.send(b"x")

    peer = Peer(drip)
    start = time.monotonic()
    with pytest.raises(ChannelTimeout):
        ch.readline()
    assert time.monotonic() - start < 3
    stop.set()
    peer.join()
    ch.close()
    client.close()


def test_each_readline_gets_a_whole_timeout_after_a_slow_line():
    server, client = socket.socketpair()
    ch = Channel(server, timeout=0.6)
    peer = Peer(send_in_pieces, client, [b"", b"x", b"y\r\n"], 0.2)  # the second read has less time left
    assert ch.readline() == b"xy\r\n"
    peer.join()
    start = time.monotonic()
    with pytest.raises(ChannelTimeout):
        ch.readline()
    assert 0.5 < time.monotonic() - start < 3
    ch.close()
    client.close()


def test_readline_raises_closed_on_eof(pair):
    ch, client = pair
    client.sendall(b"QUIT\r\nhalf a li")
    client.close()
    assert ch.readline() == b"QUIT\r\n"
    with pytest.raises(ChannelClosed):
        ch.readline()


def test_channel_requires_a_positive_timeout():
    server, client = socket.socketpair()
    with server, client:
        for bad in (None, 0, -1):
            with pytest.raises(ValueError):
                Channel(server, timeout=bad)


def test_channel_errors_share_a_base_class():
    for cls in (ChannelClosed, ChannelTimeout, LineTooLong):
        assert issubclass(cls, ChannelError)


def test_has_pending_input_only_for_a_complete_line(pair):
    ch, client = pair
    client.sendall(b"RSET\r\nNOOP\r\nQU")
    assert ch.readline() == b"RSET\r\n"
    assert ch.has_pending_input()
    assert ch.readline() == b"NOOP\r\n"
    assert not ch.has_pending_input()


# ----- write and flush


def test_write_is_buffered_until_flush(pair):
    ch, client = pair
    ch.write(b"250 2.0.0 OK\r\n")
    ch.write(b"250 2.1.0 Sender OK\r\n")
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)
    client.settimeout(5)
    ch.flush()
    assert recv_until(client, b"Sender OK\r\n") == b"250 2.0.0 OK\r\n250 2.1.0 Sender OK\r\n"


def test_flush_of_more_than_the_socket_buffer_waits_for_the_reader(pair):
    ch, client = pair
    blob = bytes(range(256)) * 16384  # 4 MiB
    peer = Peer(lambda: recv_until(client, b"\xfe\xff" * 2, limit=len(blob)))
    ch.write(blob)
    ch.flush()
    assert peer.join() == blob


def test_flush_to_a_closed_peer_raises_closed(pair):
    ch, client = pair
    client.close()
    ch.write(b"x" * 1000000)
    with pytest.raises(ChannelClosed):
        ch.flush()


# ----- read_data


def test_data_is_dot_unstuffed(pair):
    ch, client = pair
    client.sendall(b"..leading dot\r\nmid.dle\r\n...\r\n.\r\n")
    body, res = read_body(ch)
    assert body == b".leading dot\r\nmid.dle\r\n..\r\n"
    assert res.size == len(body)
    assert not res.bare_newline_seen and not res.too_big


def test_empty_body_ends_at_once(pair):
    ch, client = pair
    client.sendall(b".\r\nQUIT\r\n")
    body, res = read_body(ch)
    assert (body, res.size) == (b"", 0)
    assert ch.readline() == b"QUIT\r\n"


def test_command_pipelined_after_data_stays_buffered(pair):
    ch, client = pair
    client.sendall(b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    body, _ = read_body(ch)
    assert body == b"Subject: x\r\n\r\nhi\r\n"
    assert ch.has_pending_input()
    assert ch.readline() == b"QUIT\r\n"


def test_lf_dot_crlf_does_not_end_data(pair):
    ch, client = pair
    client.sendall(b"a\n.\r\nMAIL FROM:<evil@x>\r\n.\r\n")
    body, res = read_body(ch)
    assert body == b"a\r\n.\r\nMAIL FROM:<evil@x>\r\n"
    assert res.bare_newline_seen


def test_crlf_dot_lf_does_not_end_data(pair):
    ch, client = pair
    client.sendall(b"a\r\n.\nRSET\r\n.\r\n")
    body, res = read_body(ch)
    assert body == b"a\r\n.\r\nRSET\r\n"
    assert res.bare_newline_seen


def test_cr_dot_cr_lf_and_lf_dot_lf_do_not_end_data(pair):
    ch, client = pair
    client.sendall(b"a\r.\r\nb\n.\nc\r\n.\r\n")
    body, res = read_body(ch)
    assert body == b"a\r\n.\r\nb\r\n.\r\nc\r\n"
    assert res.bare_newline_seen


def test_reject_mode_flags_bare_newlines_and_stores_them_as_sent(pair):
    ch, client = pair
    client.sendall(b"a\nb\rc\r\n.\r\nNOOP\r\n")
    body, res = read_body(ch, bare_newline="reject")
    assert body == b"a\nb\rc\r\n"
    assert res.bare_newline_seen
    assert ch.readline() == b"NOOP\r\n"


def test_final_dot_split_across_packets_is_recognised(pair):
    ch, client = pair
    peer = Peer(send_in_pieces, client, [b"line\r", b"\n", b".", b"\r", b"\n", b"NOOP\r\n"])
    body, res = read_body(ch)
    assert body == b"line\r\n"
    assert not res.bare_newline_seen
    assert ch.readline() == b"NOOP\r\n"
    peer.join()


def test_too_big_body_is_read_to_the_end_and_session_goes_on(pair):
    ch, client = pair
    payload = b"".join(b"line %06d of a long message\r\n" % i for i in range(20000))
    peer = Peer(client.sendall, payload + b".\r\nRSET\r\n")
    body, res = read_body(ch, max_size=1000)
    assert res.too_big
    assert res.size == len(payload)
    assert len(body) <= 1000
    assert ch.readline() == b"RSET\r\n"
    peer.join()


def test_received_headers_are_counted_in_the_header_block_only(pair):
    ch, client = pair
    client.sendall(b"Received: from a\r\n\tby b\r\nRECEIVED: from c\r\nSubject: Received: no\r\n"
                   b" Received: folded, no\r\nreceived:x\r\n\r\nReceived: in the body\r\n.\r\n")
    _, res = read_body(ch)
    assert res.received_headers == 3


def test_header_count_stops_at_a_line_that_is_not_a_header(pair):
    ch, client = pair
    client.sendall(b"Received: a\r\nthis is body text\r\nReceived: b\r\n.\r\n")
    _, res = read_body(ch)
    assert res.received_headers == 1


def test_failing_sink_is_reported_and_session_goes_on(pair):
    ch, client = pair
    client.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")

    def sink(_data):
        raise OSError(28, "No space left on device")

    res = ch.read_data(sink, None, "normalize")
    assert isinstance(res.sink_error, OSError)
    assert ch.readline() == b"QUIT\r\n"


def test_data_read_times_out():
    server, client = socket.socketpair()
    ch = Channel(server, timeout=0.2)
    client.sendall(b"Subject: incomplete\r\n")
    with pytest.raises(ChannelTimeout):
        read_body(ch)
    ch.close()
    client.close()


def test_data_raises_closed_on_eof(pair):
    ch, client = pair
    client.sendall(b"Subject: x\r\n\r\nno end")
    client.close()
    with pytest.raises(ChannelClosed):
        read_body(ch)


def test_bad_bare_newline_mode_is_refused(pair):
    ch, _ = pair
    with pytest.raises(ValueError):
        ch.read_data(lambda d: None, None, "ignore")


def test_twenty_mib_body_streams_in_bounded_memory(pair):
    ch, client = pair
    lines = []
    for i in range((1 << 20) // 64):
        lines.append(b"%s%061d\r\n" % (b"." if i % 97 == 0 else b"x", i))
    chunk = b"".join(lines)  # dot lines are sent stuffed below
    wire_chunk = chunk.replace(b"\r\n.", b"\r\n..")
    if wire_chunk.startswith(b"."):
        wire_chunk = b"." + wire_chunk
    repeat = (20 << 20) // len(chunk) + 1
    expected = hashlib.sha256()
    for _ in range(repeat):
        expected.update(chunk)
    digest = hashlib.sha256()
    sizes = []

    def sink(data):
        digest.update(data)
        sizes.append(len(data))

    def send():
        for _ in range(repeat):
            client.sendall(wire_chunk)
        client.sendall(b".\r\nQUIT\r\n")

    tracemalloc.start()
    try:
        peer = Peer(send)
        start = time.monotonic()
        res = ch.read_data(sink, None, "normalize")
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    peer.join()
    assert res.size == len(chunk) * repeat >= 20 << 20
    assert digest.hexdigest() == expected.hexdigest()
    assert peak < 2 << 20, "peak %d bytes" % peak
    assert max(sizes) <= 1 << 20
    assert elapsed < 20
    assert ch.readline() == b"QUIT\r\n"


_LINE = st.binary(max_size=12).map(lambda b: bytes(b".a\r\n x"[c % 6] for c in b)).filter(lambda b: b"\r\n" not in b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=12), recv_size=st.integers(1, 7), mode=st.sampled_from(["normalize", "reject"]))
def test_any_body_round_trips_whatever_the_packet_boundaries(monkeypatch, lines, recv_size, mode):
    monkeypatch.setattr(channel_mod, "_RECV_SIZE", recv_size)
    message = b"".join(line + b"\r\n" for line in lines)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    server, client = socket.socketpair()
    try:
        ch = Channel(server, timeout=5)
        client.sendall(wire + b".\r\nNEXT\r\n")
        body, res = read_body(ch, bare_newline=mode)
        expected = re.sub(rb"\r\n|\r|\n", b"\r\n", message) if mode == "normalize" else message
        assert body == expected
        lone = message.replace(b"\r\n", b"")
        assert res.bare_newline_seen == (b"\r" in lone or b"\n" in lone)
        assert ch.readline() == b"NEXT\r\n"
    finally:
        server.close()
        client.close()


# ----- TLS contexts


def test_server_context_refuses_a_missing_certificate(tmp_path, cert_files):
    with pytest.raises(PmasterError) as info:
        server_context(str(tmp_path / "nope.pem"), cert_files[1])
    assert "nope.pem" in str(info.value) and "\n" not in str(info.value)


def test_server_context_refuses_a_missing_key(tmp_path, cert_files):
    with pytest.raises(PmasterError) as info:
        server_context(cert_files[0], str(tmp_path / "nokey.pem"))
    assert "nokey.pem" in str(info.value)


def test_server_context_refuses_garbage(tmp_path, cert_files):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(PmasterError) as info:
        server_context(str(junk), cert_files[1])
    assert "junk.pem" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(PmasterError):
        server_context(cert_files[0], str(junk))


def test_server_context_refuses_a_key_of_another_certificate(tmp_path, ca, cert_files):
    other = ca.issue_cert("other.example")
    other_key = tmp_path / "other-key.pem"
    other.private_key_pem.write_to_path(str(other_key))
    with pytest.raises(PmasterError) as info:
        server_context(cert_files[0], str(other_key))
    assert "does not match" in str(info.value)


# ----- TLS channel


def test_starttls_discards_plaintext_sent_after_the_command(server_ctx, client_ctx):
    server, client = socket.socketpair()
    client.settimeout(20)
    ch = Channel(server, timeout=5)

    def client_side():
        client.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@x>\r\n")
        assert recv_until(client, b"\r\n") == b"220 2.0.0 Ready to start TLS\r\n"
        tls = client_ctx.wrap_socket(client, server_hostname="localhost")
        tls.sendall(b"EHLO client.example\r\n")
        reply = recv_until(tls, b"\r\n")
        tls.close()
        return reply

    peer = Peer(client_side)
    assert ch.readline() == b"STARTTLS\r\n"
    assert ch.has_pending_input()  # the injected commands did arrive with it
    ch.write(b"220 2.0.0 Ready to start TLS\r\n")
    ch.start_tls(server_ctx)  # flushes the 220 first
    assert not ch.has_pending_input()
    assert ch.readline() == b"EHLO client.example\r\n"
    ch.write(b"250 ok\r\n")
    ch.flush()
    assert peer.join() == b"250 ok\r\n"
    assert ch.tls.startswith("TLSv1.")
    ch.close()


def test_tls_description_names_protocol_and_cipher(server_ctx, client_ctx):
    ch, tls = tls_pair(server_ctx, client_ctx)
    assert re.fullmatch(r"TLSv1\.[23] [A-Z0-9_-]+", ch.tls)
    assert ch.tls == tls_description(ch._ssl)
    assert ch.tls.split()[0] == tls.version()
    ch.close()
    tls.close()


def test_tls_1_2_client_is_served(server_ctx, client_ctx):
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ch, tls = tls_pair(server_ctx, client_ctx)
    assert ch.tls.startswith("TLSv1.2 ECDHE-")
    ch.close()
    tls.close()


def test_tls_lines_and_data_across_records(server_ctx, client_ctx):
    ch, tls = tls_pair(server_ctx, client_ctx)
    peer = Peer(send_in_pieces, tls, [b"MAIL FROM:<a@", b"b>\r\nDATA\r\n", b"..x\r\n", b"y\r\n.", b"\r\nQUIT\r\n"])
    assert ch.readline() == b"MAIL FROM:<a@b>\r\n"
    assert ch.readline() == b"DATA\r\n"
    body, _ = read_body(ch)
    assert body == b".x\r\ny\r\n"
    assert ch.readline() == b"QUIT\r\n"
    peer.join()
    ch.close()
    tls.close()


def test_tls_large_flush_reaches_the_client(server_ctx, client_ctx):
    ch, tls = tls_pair(server_ctx, client_ctx)
    blob = b"0123456789abcdef" * 131072  # 2 MiB, far more than the socket buffers
    peer = Peer(lambda: recv_until(tls, b"END\r\n", limit=len(blob) + 10))
    ch.write(blob + b"END\r\n")
    ch.flush()
    assert peer.join() == blob + b"END\r\n"
    ch.close()
    tls.close()


def test_tls_eof_raises_closed(server_ctx, client_ctx):
    ch, tls = tls_pair(server_ctx, client_ctx)
    tls.sendall(b"NOOP\r\n")
    tls.close()
    assert ch.readline() == b"NOOP\r\n"
    with pytest.raises(ChannelClosed):
        ch.readline()
    ch.close()


def test_tls_readline_times_out(server_ctx, client_ctx):
    ch, tls = tls_pair(server_ctx, client_ctx, timeout=0.3)
    with pytest.raises(ChannelTimeout):
        ch.readline()
    ch.close()
    tls.close()


def test_failed_handshake_raises_closed(server_ctx):
    server, client = socket.socketpair()
    ch = Channel(server, timeout=5)
    client.sendall(b"EHLO this is not a TLS client hello\r\n" * 10)
    with pytest.raises(ChannelClosed):
        ch.start_tls(server_ctx)
    ch.close()
    client.close()


def test_handshake_times_out_when_the_client_stays_silent(server_ctx):
    server, client = socket.socketpair()
    ch = Channel(server, timeout=0.3)
    with pytest.raises(ChannelTimeout):
        ch.start_tls(server_ctx)
    ch.close()
    client.close()


def test_second_starttls_is_refused(server_ctx, client_ctx):
    ch, tls = tls_pair(server_ctx, client_ctx)
    with pytest.raises(ChannelError):
        ch.start_tls(server_ctx)
    ch.close()
    tls.close()


def test_tls_over_loopback_tcp(server_ctx, client_ctx):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)

    def client_side():
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            raw.sendall(b"STARTTLS\r\n")
            recv_until(raw, b"\r\n")
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"QUIT\r\n")
                return recv_until(tls, b"\r\n")

    peer = Peer(client_side)
    conn, _ = listener.accept()
    ch = Channel(conn, timeout=5)
    assert ch.readline() == b"STARTTLS\r\n"
    ch.write(b"220 go\r\n")
    ch.start_tls(server_ctx)
    assert ch.readline() == b"QUIT\r\n"
    ch.write(b"221 bye\r\n")
    ch.flush()
    assert peer.join() == b"221 bye\r\n"
    ch.close()
    listener.close()
