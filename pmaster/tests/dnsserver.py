"""A small authoritative DNS server on loopback for tests (UDP and TCP, built on dnslib).

API:
  ``DnsServer(records, zones=(), timeout_names=(), servfail_names=())``, a context manager::

      records = {
          "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
          "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
          "nomail.test": {"MX": [(0, ".")]},          # null MX (RFC 7505)
          "alias.test": {"CNAME": "mx1.example.test"},
          "spf.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},  # one string, or a list: one record
      }
      with DnsServer(records, zones=("test",), timeout_names=("slow.test",)) as dns:
          Resolver(dns.address, timeout=1).mx_hosts("example.test")

  ``.address`` is ``("127.0.0.1", port)``; UDP and TCP listen on the same port.
  A name in ``records`` without the asked type gets an empty NOERROR answer (NODATA); an unknown name at or
  under one of ``zones`` gets NXDOMAIN; any other unknown name gets REFUSED; a name in ``timeout_names`` is
  never answered (the client times out); a name in ``servfail_names`` gets SERVFAIL.
  ``.queries`` lists ``(name, type)`` of every question received; ``records`` may be changed while running.
Invariants: names compare case-insensitively without the trailing dot; answers carry TTL 60.
Threading: one thread per server (UDP) plus one per TCP connection; ``queries`` is appended under a lock.
"""

import socket
import socketserver
import struct
import threading
from typing import Dict, Iterable, List, Optional, Tuple

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, TXT, A, DNSRecord

TTL = 60

_RDATA = {"A": A, "AAAA": AAAA}


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


class DnsServer:
    """Serve ``records`` on 127.0.0.1 (UDP and TCP, same ephemeral port) until ``close()``."""

    def __init__(self, records: Dict[str, Dict[str, object]], zones: Iterable[str] = (),
                 timeout_names: Iterable[str] = (), servfail_names: Iterable[str] = ()):
        self.records = {_norm(k): v for k, v in records.items()}
        self.zones = tuple(_norm(z) for z in zones)
        self.timeout_names = {_norm(n) for n in timeout_names}
        self.servfail_names = {_norm(n) for n in servfail_names}
        self.queries: List[Tuple[str, str]] = []
        self._lock = threading.Lock()
        self._udp: Optional[socketserver.UDPServer] = None
        self._tcp: Optional[socketserver.TCPServer] = None
        self._threads: List[threading.Thread] = []

    @property
    def address(self) -> Tuple[str, int]:
        assert self._udp is not None, "server not started"
        return ("127.0.0.1", self._udp.server_address[1])

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "DnsServer":
        # Bind UDP on an ephemeral port, then TCP on the same port; retry a few times if TCP's is taken.
        for _ in range(20):
            udp = _UdpServer(("127.0.0.1", 0), _UdpHandler, self)
            try:
                tcp = _TcpServer(("127.0.0.1", udp.server_address[1]), _TcpHandler, self)
            except OSError:
                udp.server_close()
                continue
            self._udp, self._tcp = udp, tcp
            break
        else:
            raise OSError("cannot bind UDP and TCP on one port")
        for name, srv in (("udp", self._udp), ("tcp", self._tcp)):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 name="dnsserver-%s" % name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> "DnsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- answering ---------------------------------------------------------------------------------

    def answer(self, data: bytes) -> Optional[bytes]:
        """The reply packet for a query packet, or None to stay silent."""
        try:
            request = DNSRecord.parse(data)
        except Exception:  # garbage: a real server would drop it too
            return None
        qname = _norm(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((qname, qtype))
        if qname in self.timeout_names:
            return None
        reply = request.reply()  # sets QR, AA, RD/RA, copies the question
        if qname in self.servfail_names:
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()
        self._fill(reply, qname, qtype, depth=0)
        return reply.pack()

    def _fill(self, reply: DNSRecord, qname: str, qtype: str, depth: int) -> None:
        entry = self.records.get(qname)
        if entry is None:
            in_zone = any(qname == z or qname.endswith("." + z) for z in self.zones)
            reply.header.rcode = RCODE.NXDOMAIN if in_zone else RCODE.REFUSED
            return
        target = entry.get("CNAME")
        if target and qtype != "CNAME" and depth < 8:
            reply.add_answer(RR(qname, QTYPE.CNAME, ttl=TTL, rdata=CNAME(str(target))))
            self._fill(reply, _norm(str(target)), qtype, depth + 1)
            return
        for rr in self._rrs(qname, qtype, entry):
            reply.add_answer(rr)

    @staticmethod
    def _rrs(qname: str, qtype: str, entry: Dict[str, object]) -> List[RR]:
        values = entry.get(qtype) or []
        if qtype == "MX":
            return [RR(qname, QTYPE.MX, ttl=TTL, rdata=MX(str(host) if host != "." else ".", int(pref)))
                    for pref, host in values]  # type: ignore[union-attr]
        if qtype in _RDATA:
            return [RR(qname, getattr(QTYPE, qtype), ttl=TTL, rdata=_RDATA[qtype](ip))
                    for ip in values]  # type: ignore[union-attr]
        if qtype == "TXT":
            # A TXT value is one string, or a list of strings that make one record (RFC 7208 3.3).
            return [RR(qname, QTYPE.TXT, ttl=TTL, rdata=TXT(list(v) if isinstance(v, (list, tuple)) else str(v)))
                    for v in values]  # type: ignore[union-attr]
        if qtype == "CNAME" and entry.get("CNAME"):
            return [RR(qname, QTYPE.CNAME, ttl=TTL, rdata=CNAME(str(entry["CNAME"])))]
        return []


class _UdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, address, handler, owner: DnsServer):
        self.owner = owner
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        pass  # a test DNS server: a failed reply is the client's timeout


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 64

    def __init__(self, address, handler, owner: DnsServer):
        self.owner = owner
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        pass


class _UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        out = self.server.owner.answer(data)  # type: ignore[attr-defined]
        if out is not None:
            sock.sendto(out, self.client_address)


class _TcpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(5)
        for _ in range(100):  # bounded: a client reuses a TCP connection for a few queries at most
            head = _recv_exact(sock, 2)
            if head is None:
                return
            data = _recv_exact(sock, struct.unpack("!H", head)[0])
            if data is None:
                return
            out = self.server.owner.answer(data)  # type: ignore[attr-defined]
            if out is None:
                continue
            sock.sendall(struct.pack("!H", len(out)) + out)


def _recv_exact(sock: socket.socket, n: int) -> Optional[bytes]:
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf
