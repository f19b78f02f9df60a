"""``pmaster sendmail``: the sendmail(1) command line for local programs (cron, PHP, mailx, git, mutt).

API: ``main(argv, prog="pmaster sendmail") -> int``; ``parse_args(argv) -> Options`` (``UsageError``).
  pmaster started under the name ``sendmail`` runs ``main`` with all its arguments, under the name ``mailq``
  lists the queue (``-bp``).
Options (Postfix's sendmail(1), SPEC 10): ``-t`` recipients from To:/Cc:/Bcc: (Resent-* when present) added to
  those given; Bcc: removed. ``-i``/``-oi`` a lone "." does not end the input. ``-f``/``-r ADDR`` the envelope
  sender (``<>`` the null sender). ``-F NAME`` the full name for an added From:. ``-bm`` (default), ``-bp``
  (list the queue), ``-bs`` (SMTP on stdin/stdout), ``-bi``/``-I`` (no alias database: nothing to do), ``-q``
  (flush the queue), ``-N DSN``, ``-V ENVID``, ``-R RET``, ``-B 7BIT|8BITMIME``, ``-C FILE`` (configuration).
  Accepted and ignored: ``-o*`` (but ``-oi``), ``-A*``, ``-L``, ``-O``, ``-X``, ``-e``, ``-h``, ``-p`` (with an
  argument), ``-c -G -m -n -U -v -x``. Grouped (``-ti``) and glued (``-froot``) forms as getopt(3) reads them;
  ``--`` ends the options, and so does the first word that is not an option.
Invariants: exit 0 only once the message is in ``maildrop/`` and fsynced. Exit 64 (EX_USAGE): unknown option,
  no recipients, a bad address, CR or LF in an argument; nothing is written then. Exit 75 (EX_TEMPFAIL): the
  configuration or the spool cannot take it now; nothing is queued and the message says so. The input is read
  to its end before any exit, so a writer into our stdin never gets SIGPIPE.
Errors: one line on stderr, ``PROG: message``; never a traceback.
"""

import argparse
import os
import pwd
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, List, Optional, Tuple

from pmaster.config import DEFAULT_CONFIG, load
from pmaster.errors import PmasterError, UsageError
from pmaster.spool import maildrop_directory, prepare_maildrop
from pmaster.submit import message
from pmaster.submit.maildrop import MaildropWriter, Submission

EX_OK, EX_USAGE, EX_TEMPFAIL = 0, 64, 75
# getopt(3) string of Postfix's sendmail: these letters take an argument.
WITH_ARGUMENT = set("ABCFLNORVXbefhopr")
FLAGS = set("GIUcimntvx")
IGNORED_WITH_ARGUMENT = set("ALOXehp")
MAX_HEADER_BLOCK = 1 << 20  # beyond this much header, the rest counts as body (as Postfix's header_size_limit)
_BAD_LOCAL = re.compile(r"[\x00-\x20\x7f<>()\[\],;\\]")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.?"
                     r"|\[[^\[\]\s\\]+\]")


@dataclass
class Options:
    mode: str = "m"  # -bX
    extract: bool = False  # -t
    dot_ends: bool = True  # cleared by -i / -oi
    sender: Optional[str] = None  # -f / -r
    full_name: Optional[str] = None  # -F
    config: Optional[str] = None  # -C
    body_type: str = ""  # -B
    notify: str = ""  # -N
    envid: str = ""  # -V
    ret: str = ""  # -R
    flush: bool = False  # -q
    recipients: List[str] = field(default_factory=list)


def _no_crlf(what: str, value: str) -> str:
    if "\r" in value or "\n" in value or "\0" in value:
        raise UsageError("%s: CR, LF or NUL in %r" % (what, value))
    return value


def _set(opts: Options, letter: str, value: str) -> None:
    """Apply one option that takes an argument."""
    _no_crlf("-" + letter, value)
    if letter in ("f", "r"):
        opts.sender = value
    elif letter == "F":
        opts.full_name = value
    elif letter == "C":
        opts.config = value
    elif letter == "b":
        opts.mode = value
    elif letter == "o":
        if value == "i":
            opts.dot_ends = False
    elif letter == "B":
        opts.body_type = value.upper()
        if opts.body_type not in ("7BIT", "8BITMIME"):
            raise UsageError("-B %s: the body type is 7BIT or 8BITMIME" % value)
    elif letter == "N":
        words = [w.strip().lower() for w in value.split(",")]
        if not (words == ["never"] or all(w in ("success", "failure", "delay") for w in words)):
            raise UsageError("-N %s: expected never, or a list of success, failure, delay" % value)
        opts.notify = ",".join(words)
    elif letter == "V":
        opts.envid = value
    elif letter == "R":
        if value.lower() not in ("full", "hdrs"):
            raise UsageError("-R %s: expected full or hdrs" % value)
        opts.ret = value.lower()
    # IGNORED_WITH_ARGUMENT: accepted for compatibility, nothing to do


def parse_args(argv: List[str]) -> Options:
    """getopt(3) with "+": options end at ``--`` or at the first word that is no option."""
    opts = Options()
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            break
        if not word.startswith("-") or word == "-":
            i -= 1
            break
        j = 1
        while j < len(word):
            letter = word[j]
            j += 1
            if letter == "q":
                opts.flush = True  # -q, -q30m, -qIid, -qRsite: flush the whole queue (see the docs)
                break
            if letter in WITH_ARGUMENT:
                if j < len(word):
                    value = word[j:]
                elif i < len(argv):
                    value = argv[i]
                    i += 1
                else:
                    raise UsageError("option -%s needs an argument" % letter)
                _set(opts, letter, value)
                break
            if letter not in FLAGS:
                raise UsageError("unknown option -%s" % _printable(letter))
            if letter == "t":
                opts.extract = True
            elif letter == "i":
                opts.dot_ends = False
            elif letter == "I":
                opts.mode = "i"
    opts.recipients = [_no_crlf("recipient", a) for a in argv[i:]]
    return opts


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def check_address(address: str, what: str) -> str:
    """A bare name or local@domain without spaces or specials; ``UsageError`` otherwise."""
    local, at, domain = address.rpartition("@") if "@" in address else (address, "", "")
    if address.startswith("-") or not local or (at and not _DOMAIN.fullmatch(domain)):
        raise UsageError("bad %s address %r" % (what, _printable(address)))
    if not (local.startswith('"') and local.endswith('"') and len(local) > 1) and _BAD_LOCAL.search(local):
        raise UsageError("bad %s address %r" % (what, _printable(address)))
    return address


def sender_address(opts: Options, login: str) -> str:
    if opts.sender is None:
        return login
    value = opts.sender.strip()
    if value in ("<>", ""):
        return ""
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    got = message.addresses([value]) if ("<" in value or " " in value) else [value]
    if len(got) != 1:
        raise UsageError("bad sender address %r" % _printable(opts.sender))
    return check_address(got[0], "sender")


def command_line_recipients(words: List[str]) -> List[str]:
    out = []
    for word in words:
        found = message.addresses([word])
        if not found and word.strip():
            raise UsageError("bad recipient address %r" % _printable(word))
        out += [check_address(a, "recipient") for a in found]
    return out


# -- reading the message


def input_lines(stream: BinaryIO, dot_ends: bool) -> Iterator[bytes]:
    """Lines without their end (LF or CRLF); a lone "." ends the input unless ``-i``."""
    for raw in stream:
        line = raw[:-1] if raw.endswith(b"\n") else raw
        if line.endswith(b"\r"):
            line = line[:-1]
        if dot_ends and line == b".":
            return
        yield line


@dataclass
class HeaderBlock:
    lines: List[bytes]  # kept fields, with continuation lines (Bcc: removed under -t)
    recipients: List[str]  # from To/Cc/Bcc (or Resent-*) when -t
    rest: List[bytes]  # the first body line(s) read past the header block


def read_header_block(lines: Iterator[bytes], extract: bool) -> HeaderBlock:
    fields: List[List[bytes]] = []
    rest: List[bytes] = []
    size = 0
    for line in lines:
        size += len(line) + 2
        if fields and message.is_continuation(line):
            fields[-1].append(line)
        elif message.is_field_line(line) and size <= MAX_HEADER_BLOCK:
            fields.append([line])
        else:
            rest.append(line)
            break
    recipients: List[str] = []
    if extract:
        names = {message.field_name(f[0]) for f in fields}
        resent = bool(names & {"resent-to", "resent-cc", "resent-bcc"})
        wanted = ("resent-to", "resent-cc", "resent-bcc") if resent else ("to", "cc", "bcc")
        values = [b" ".join(x.strip() for x in f).split(b":", 1)[1].decode("utf-8", "replace")
                  for f in fields if message.field_name(f[0]) in wanted]
        recipients = message.addresses(values)
        drop = "resent-bcc" if resent else "bcc"
        fields = [f for f in fields if message.field_name(f[0]) != drop]
    return HeaderBlock([line for f in fields for line in f], recipients, rest)


# -- the command


def _drain(stream: BinaryIO) -> None:
    """Read what is left, so the writer into our stdin is not killed by SIGPIPE when we refuse."""
    try:
        while stream.read(1 << 16):
            pass
    except (OSError, ValueError):
        pass


def _login() -> Tuple[str, str, int]:
    uid = os.getuid()
    try:
        pw = pwd.getpwuid(uid)
        return pw.pw_name, pw.pw_gecos.split(",")[0], uid
    except KeyError:
        return "#%d" % uid, "", uid


def _config(opts: Options):
    path = opts.config or os.environ.get("PMASTER_CONFIG") or DEFAULT_CONFIG
    return load(path)


def _maildrop(config) -> str:
    path = maildrop_directory(config.core.spool_directory)
    if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
        raise PmasterError("cannot write to %s: permission denied (mode %o)" % (path, os.stat(path).st_mode & 0o7777))
    if not os.path.isdir(path):
        try:
            prepare_maildrop(config.core.spool_directory)  # root before the first start of the daemon
        except OSError as exc:
            raise PmasterError("no maildrop directory %s (%s): start the daemon once" % (path, exc.strerror or exc))
    return path


def _check_space(path: str, config) -> None:
    try:
        st = os.statvfs(path)
    except OSError as exc:
        raise PmasterError("cannot check free space in %s: %s" % (path, exc.strerror or exc)) from None
    if st.f_bavail * st.f_frsize < config.core.min_free_space:
        raise PmasterError("insufficient disk space in %s" % path)


def submit(opts: Options, stream: BinaryIO) -> str:
    """Read the message from ``stream`` and drop it; returns the maildrop file's name."""
    login, gecos, uid = _login()
    sender = sender_address(opts, login)
    recipients = command_line_recipients(opts.recipients)
    if not recipients and not opts.extract:
        raise UsageError("no recipients: give them on the command line or use -t")
    lines = input_lines(stream, opts.dot_ends)
    block = read_header_block(lines, opts.extract)
    if opts.extract:
        recipients += [check_address(a, "recipient") for a in block.recipients]
    if not recipients:
        raise UsageError("no recipient addresses found in the message header")
    config = _config(opts)
    directory = _maildrop(config)
    _check_space(directory, config)
    sub = Submission(sender=sender, recipients=recipients, uid=uid, full_name=opts.full_name or gecos,
                     body_type=opts.body_type or "7BIT", envid=opts.envid, notify=opts.notify, ret=opts.ret)
    writer = MaildropWriter(directory)
    try:
        writer.start(sub)
        _write_body(writer, block, lines)
        return writer.finish()
    except OSError as exc:
        writer.abort()
        raise PmasterError("cannot write to %s: %s; nothing queued" % (directory, exc.strerror or exc)) from None
    except BaseException:
        writer.abort()
        raise


def _write_body(writer: MaildropWriter, block: HeaderBlock, lines: Iterator[bytes]) -> None:
    for line in block.lines:
        writer.write(line + b"\r\n")
    if not block.rest or block.rest[0] != b"":
        writer.write(b"\r\n")  # RFC 5322: an empty line between header and body, also when none was given
    for line in block.rest:
        writer.write(line + b"\r\n")
    chunk: List[bytes] = []
    size = 0
    for line in lines:
        chunk.append(line)
        size += len(line) + 2
        if size >= 1 << 16:
            writer.write(b"\r\n".join(chunk) + b"\r\n")
            chunk, size = [], 0
    if chunk:
        writer.write(b"\r\n".join(chunk) + b"\r\n")


def _queue(opts: Options, action: str) -> int:
    from pmaster import queuecmd

    path = opts.config or os.environ.get("PMASTER_CONFIG") or DEFAULT_CONFIG
    return queuecmd.main(argparse.Namespace(config=path, action=action, id=None, json=False))


def run(opts: Options, stdin: BinaryIO, stdout: BinaryIO) -> int:
    if opts.mode == "p":
        return _queue(opts, "list")
    if opts.flush and opts.mode == "m" and not opts.recipients:
        return _queue(opts, "flush")
    if opts.mode == "i":
        return EX_OK  # newaliases: routing tables are read at start and on SIGHUP, there is no database to build
    if opts.mode == "s":
        from pmaster.submit import smtpstdio

        config = _config(opts)
        return smtpstdio.serve(stdin, stdout, config, lambda sub, body: _drop(config, sub, body), _login())
    if opts.mode != "m":
        raise UsageError("-b%s is not supported (only -bm, -bp, -bs, -bi)" % _printable(opts.mode))
    submit(opts, stdin)
    return EX_OK


def _drop(config, sub: Submission, body: List[bytes]) -> str:
    directory = _maildrop(config)
    _check_space(directory, config)
    writer = MaildropWriter(directory)
    try:
        writer.start(sub)
        for line in body:
            writer.write(line + b"\r\n")
        return writer.finish()
    except OSError as exc:
        writer.abort()
        raise PmasterError("cannot write to %s: %s; nothing queued" % (directory, exc.strerror or exc)) from None


def main(argv: List[str], prog: str = "pmaster sendmail") -> int:
    stdin = sys.stdin.buffer
    try:
        opts = parse_args(argv)
        if prog == "mailq":
            opts.mode = "p"
        code = run(opts, stdin, sys.stdout.buffer)
        sys.stdout.flush()
        return code
    except UsageError as exc:
        _drain(stdin)
        sys.stderr.write("%s: %s\n" % (prog, exc))
        return EX_USAGE
    except PmasterError as exc:
        _drain(stdin)
        text = str(exc).replace("\n", "; ")
        sys.stderr.write("%s: %s\n" % (prog, text))
        return EX_TEMPFAIL
    except (socket.error, OSError) as exc:
        _drain(stdin)
        sys.stderr.write("%s: %s; nothing queued\n" % (prog, exc))
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        return EX_TEMPFAIL
