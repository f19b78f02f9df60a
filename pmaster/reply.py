"""SMTP replies: the ``Reply`` value and the catalogue of named replies used by server and tests.

RFC 2034: an enhanced status code goes on every 2xx, 4xx and 5xx reply except the greeting and the
HELO/EHLO reply, never on 3xx. ``Reply.lines()`` renders a possibly multi-line reply.
"""

from dataclasses import dataclass
from typing import List, Optional


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: Optional[str]
    text: str

    def lines(self) -> List[str]:
        texts = self.text.split("\n") or [""]
        out = []
        for i, t in enumerate(texts):
            sep = "-" if i < len(texts) - 1 else " "
            body = "%s %s" % (self.enhanced, t) if self.enhanced else t
            out.append("%d%s%s" % (self.code, sep, body))
        return out

    def to_bytes(self) -> bytes:
        cached = self.__dict__.get("_bytes")  # the catalogue's replies are sent over and over
        if cached is None:
            cached = "".join(line + "\r\n" for line in self.lines()).encode("utf-8", "replace")
            object.__setattr__(self, "_bytes", cached)  # not a field: equality and hash ignore it
        return cached

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return " ".join(self.lines()[-1:]) if "\n" not in self.text else " / ".join(self.lines())


def reply(code: int, enhanced: Optional[str], text: str) -> Reply:
    return Reply(code, enhanced, text)


OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
NOOP_OK = Reply(250, "2.0.0", "OK")
BYE = Reply(221, "2.0.0", "Bye")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
VRFY_CANNOT = Reply(252, "2.5.2", "Cannot VRFY user; try RCPT to attempt delivery")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
# After a 5xx greeting only QUIT is answered otherwise (RFC 5321 3.1).
REFUSED_AT_GREETING = Reply(503, "5.5.1", "Bad sequence of commands: the connection was refused; send QUIT")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT before DATA")
NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
NO_ROUTE = Reply(550, "5.1.1", "Recipient address rejected: no route")
BAD_SENDER = Reply(553, "5.1.7", "Sender address rejected")
BAD_RECIPIENT = Reply(553, "5.1.3", "Recipient address rejected")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_NEWLINE = Reply(550, "5.5.2", "Bare <LF> or <CR> in message text refused")
MAIL_LOOP = Reply(554, "5.4.6", "Too many Received: headers: mail loop")
STORAGE_FAILED = Reply(452, "4.3.1", "Insufficient system storage")
LOW_DISK = Reply(452, "4.3.1", "Insufficient system storage")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
LOCAL_ERROR = Reply(421, "4.3.0", "Local error, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
POLICY_ERROR = Reply(451, "4.3.0", "Temporary policy failure")
