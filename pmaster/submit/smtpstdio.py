"""``sendmail -bs``: an SMTP dialogue on stdin and stdout that drops each message into ``maildrop/``.

API: ``serve(stdin, stdout, config, drop, login) -> int``; ``drop(Submission, body_lines) -> name`` writes one
  maildrop file (fsynced) and raises ``PmasterError`` when it cannot; ``login`` is (name, full name, uid).
Invariants: ``250`` after DATA only once the file is fsynced; every other failure is a 4xx/5xx reply, never an
  exit in the middle of the dialogue. The message is held in memory (local programs send small mail this way:
  Postfix runs its smtpd here, which a pickup-based design need not).
Errors: end of input ends the dialogue (exit 0); a message already answered 250 stays queued.
"""

import re
from typing import BinaryIO, Callable, List, Tuple

from pmaster.errors import PmasterError, UsageError
from pmaster.submit.maildrop import Submission

_MAIL = re.compile(rb"(?i)MAIL FROM:\s*<([^<>]*)>\s*(.*)")
_RCPT = re.compile(rb"(?i)RCPT TO:\s*<([^<>]*)>\s*(.*)")
MAX_RECIPIENTS = 1000
MAX_LINE = 4096


def serve(stdin: BinaryIO, stdout: BinaryIO, config, drop: Callable[[Submission, List[bytes]], str],
          login: Tuple[str, str, int]) -> int:
    from pmaster.submit.sendmail import check_address

    def say(text: str) -> None:
        stdout.write(text.encode("utf-8") + b"\r\n")
        stdout.flush()

    hostname = config.core.hostname
    sender = None
    recipients: List[str] = []
    body_type = "7BIT"
    say("220 %s ESMTP Postmaster" % hostname)
    while True:
        raw = stdin.readline(MAX_LINE)
        if not raw:
            return 0
        line = raw.rstrip(b"\r\n")
        verb = line[:4].upper()
        if verb == b"EHLO":
            say("250-%s\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES" % hostname)
        elif verb == b"HELO":
            say("250 %s" % hostname)
        elif verb == b"MAIL":
            m = _MAIL.fullmatch(line)
            if sender is not None:
                say("503 5.5.1 Error: nested MAIL command")
                continue
            if m is None:
                say("501 5.5.4 Syntax: MAIL FROM:<address>")
                continue
            try:
                addr = m.group(1).decode("utf-8")
                sender = check_address(addr, "sender") if addr else ""
            except (UsageError, UnicodeDecodeError):
                say("553 5.1.7 Bad sender address syntax")
                continue
            body_type = "8BITMIME" if b"BODY=8BITMIME" in m.group(2).upper() else "7BIT"
            say("250 2.1.0 Ok")
        elif verb == b"RCPT":
            m = _RCPT.fullmatch(line)
            if sender is None:
                say("503 5.5.1 Error: need MAIL command")
            elif m is None:
                say("501 5.5.4 Syntax: RCPT TO:<address>")
            elif len(recipients) >= MAX_RECIPIENTS:
                say("452 4.5.3 Error: too many recipients")
            else:
                try:
                    recipients.append(check_address(m.group(1).decode("utf-8"), "recipient"))
                    say("250 2.1.5 Ok")
                except (UsageError, UnicodeDecodeError):
                    say("553 5.1.3 Bad recipient address syntax")
        elif verb == b"DATA":
            if sender is None or not recipients:
                say("503 5.5.1 Error: need %s command" % ("MAIL" if sender is None else "RCPT"))
                continue
            say("354 End data with <CR><LF>.<CR><LF>")
            body = _read_data(stdin)
            if body is None:
                return 0  # end of input inside DATA: nothing was promised
            sub = Submission(sender=sender, recipients=recipients, uid=login[2], full_name=login[1],
                             body_type=body_type)
            try:
                name = drop(sub, body)
                say("250 2.0.0 Ok: queued as %s" % name)
            except PmasterError as exc:
                say("451 4.3.0 Error: %s" % str(exc).replace("\r", " ").replace("\n", " "))
            sender, recipients = None, []
        elif verb == b"RSET":
            sender, recipients = None, []
            say("250 2.0.0 Ok")
        elif verb == b"NOOP":
            say("250 2.0.0 Ok")
        elif verb == b"QUIT":
            say("221 2.0.0 Bye")
            return 0
        else:
            say("502 5.5.2 Error: command not recognized")


def _read_data(stdin: BinaryIO):
    lines: List[bytes] = []
    while True:
        raw = stdin.readline()
        if not raw:
            return None
        line = raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw
        if line == b".":
            return lines
        lines.append(line[1:] if line.startswith(b".") else line)  # RFC 5321 4.5.2
