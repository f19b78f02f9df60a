"""SMTP command-line grammar (PLY lexer and LALR parser): one line in, one ``Command`` value out.

API:
  ``parse_command(line) -> Command``: ``line`` is the decoded command line without its CRLF (a trailing CR/LF
     is tolerated). ``Command.verb`` is upper case; HELO/EHLO fill ``domain``; MAIL/RCPT fill ``address``
     ('' for ``<>``) and ``params`` (upper-case keyword -> value or None); VRFY, EXPN, NOOP, HELP and the
     unimplemented TURN, SEND, SOML, SAML fill ``argument`` (None when absent).
  ``SmtpSyntaxError(reply)``: an ``SmtpError`` whose ``reply`` the session sends as is.
Invariants (SPEC 4 and 9): verbs and FROM:/TO: are case-insensitive; a space after the colon and a path without
  angle brackets are tolerated (as Postfix does); source routes ``<@a,@b:u@c>`` are accepted and dropped; quoted
  local parts are kept with their quotes; local parts keep their case; domains are lower-cased and lose a
  trailing dot (``envelope.normalize_address``); address literals are checked (IPv4, ``IPv6:``, general);
  non-ASCII in an address is accepted (broken clients send it without SMTPUTF8: answer, never crash).
  Replies: unknown verb ``500 5.5.2``; bad arguments ``501 5.5.4``; bad MAIL/RCPT address ``501 5.1.7`` /
  ``501 5.1.3``; C1 controls, U+2028/U+2029 and bidi controls in a HELO name (``501 5.5.4``) or an address
  (``501 5.1.7`` / ``501 5.1.3``) are refused (``sanitize.has_unsafe``). The only exception ``parse_command`` raises is ``SmtpSyntaxError``.
Threading: lexer and LR tables are built once at import; each thread gets its own parser object (sharing the
  read-only tables) and its own lexer clone, because PLY keeps parse stacks and lexer state on those objects.
Errors: grammar rules and token patterns are attached by decorators rather than written as docstrings, so
  the module also works under ``python -OO``.
"""

import copy
import functools
import ipaddress
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import ply.lex as lex
import ply.yacc as yacc

from pmaster import reply as replies
from pmaster import sanitize
from pmaster.envelope import normalize_address
from pmaster.errors import SmtpError
from pmaster.reply import Reply

_SPECIALS = re.compile(r"[()\\;]")


class SmtpSyntaxError(SmtpError):
    """A command line the grammar refuses; ``reply`` says why (500 or 501)."""


@dataclass(frozen=True)
class Command:
    verb: str
    domain: Optional[str] = None
    address: Optional[str] = None
    params: Dict[str, Optional[str]] = field(default_factory=dict, hash=False)
    argument: Optional[str] = None


# verb -> lexer state for its arguments
_VERBS = {
    "HELO": "text", "EHLO": "text", "VRFY": "text", "EXPN": "text", "NOOP": "text", "HELP": "text",
    "TURN": "text", "SEND": "text", "SOML": "text", "SAML": "text",
    "DATA": "text", "RSET": "text", "QUIT": "text", "STARTTLS": "text",
    "MAIL": "path", "RCPT": "path",
}
_USAGE = {
    "HELO": "HELO hostname", "EHLO": "EHLO hostname", "MAIL": "MAIL FROM:<address>", "RCPT": "RCPT TO:<address>",
    "VRFY": "VRFY address", "EXPN": "EXPN mailing-list",
}

BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")

# Phases of a MAIL/RCPT line, recorded on each token so an error names the part that is wrong.
_KEYWORD, _ADDRESS, _PARAMS = "keyword", "address", "params"

# RFC 5321 Let-dig: a label neither starts nor ends with "-" (a leading one would reach ${RCPT_DOMAIN} as an
# option); "_" is tolerated, as Postfix does, and 8-bit labels are kept for broken clients.
_LABEL = "[A-Za-z0-9_\u0080-\U0010ffff](?:[A-Za-z0-9_\\-\u0080-\U0010ffff]*[A-Za-z0-9_\u0080-\U0010ffff])?"
_DOMAIN = re.compile("%s(?:\\.%s)*\\.?" % (_LABEL, _LABEL))
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_VERB_CHARS = re.compile(r"[A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _Fail(Exception):
    """Internal: which part of the line is wrong ("verb", "args" or "address")."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def _rule(text: str) -> Callable:
    """Attach a grammar production as the docstring PLY reads, in a way ``-OO`` does not strip."""

    def attach(func: Callable) -> Callable:
        func.__doc__ = text
        return func

    return attach


def _mark(t):
    """Record the phase a MAIL/RCPT token belongs to, then advance the lexer's phase."""
    lx = t.lexer
    t.phase = lx.phase
    if lx.phase == _KEYWORD:
        if t.type == "COLON":
            lx.phase = _ADDRESS
    elif lx.phase == _ADDRESS:
        if t.type == "GT" and lx.depth:
            lx.phase = _PARAMS
        elif t.type == "SP":
            if lx.addr_seen and not lx.depth:
                lx.phase = _PARAMS  # the end of an address without angle brackets
        else:
            lx.addr_seen = True
            if t.type == "LT":
                lx.depth += 1
    return t


_VERB_TOKENS = tuple(sorted(_VERBS))
_ARG_TOKENS = ("SP", "TEXT", "LT", "GT", "AT", "COMMA", "COLON", "EQUALS", "QSTRING", "LITERAL", "WORD")


class _Tokens:
    """Token rules; an instance is the ``module=`` object of the lexer. Functions are tried in order."""

    tokens = _VERB_TOKENS + _ARG_TOKENS
    states = (("path", "exclusive"), ("text", "exclusive"))
    t_ignore = ""
    t_path_ignore = ""
    t_text_ignore = ""

    # INITIAL: the verb only; it decides how the rest of the line is read.
    @lex.TOKEN(r"[^ \t]+")
    def t_VERB(self, t):
        verb = t.value.upper()
        # ASCII only: "ſtarttls".upper() is "STARTTLS"
        if not _VERB_CHARS.fullmatch(t.value) or verb not in _VERBS:
            raise _Fail("verb")
        t.type = verb
        t.lexer.verb = verb
        t.lexer.begin(_VERBS[verb])
        return t

    def t_error(self, t):
        raise _Fail("verb")

    # text: free-form arguments
    @lex.TOKEN(r"[ \t]+")
    def t_text_SP(self, t):
        return t

    @lex.TOKEN(r"[^ \t].*")
    def t_text_TEXT(self, t):
        return t

    def t_text_error(self, t):
        raise _Fail("args")

    # path: MAIL FROM:<...> / RCPT TO:<...> and ESMTP parameters
    @lex.TOKEN(r"[ \t]+")
    def t_path_SP(self, t):
        return _mark(t)

    @lex.TOKEN(r'"(?:[^"\\\x00-\x1f\x7f]|\\[\x20-\x7e])*"')
    def t_path_QSTRING(self, t):
        return _mark(t)

    @lex.TOKEN(r"\[[^\[\]\\\x00-\x20\x7f]*\]")
    def t_path_LITERAL(self, t):
        return _mark(t)

    @lex.TOKEN(r'[^ \t<>@,:="\[\]\x00-\x1f\x7f]+')
    def t_path_WORD(self, t):
        return _mark(t)

    @lex.TOKEN(r"<")
    def t_path_LT(self, t):
        return _mark(t)

    @lex.TOKEN(r">")
    def t_path_GT(self, t):
        return _mark(t)

    @lex.TOKEN(r"@")
    def t_path_AT(self, t):
        return _mark(t)

    @lex.TOKEN(r",")
    def t_path_COMMA(self, t):
        return _mark(t)

    @lex.TOKEN(r":")
    def t_path_COLON(self, t):
        return _mark(t)

    @lex.TOKEN(r"=")
    def t_path_EQUALS(self, t):
        return _mark(t)

    def t_path_error(self, t):
        raise _Fail("address" if t.lexer.phase == _ADDRESS else "args")


class _Grammar:
    """Grammar rules; an instance is the ``module=`` object of the parser. Actions only build values."""

    tokens = _Tokens.tokens
    start = "command"

    @_rule("""command : HELO text_required
                      | EHLO text_required""")
    def p_command_helo(self, p):
        text = p[2]
        if _CONTROL.search(text) or sanitize.has_unsafe(text):
            raise _Fail("args")  # it goes into the Received: header and the log (issue 17 item 10)
        p[0] = Command(p[1].upper(), domain=" ".join(text.split()))

    @_rule("""command : VRFY text_required
                      | EXPN text_optional
                      | NOOP text_optional
                      | HELP text_optional
                      | TURN text_optional
                      | SEND text_optional
                      | SOML text_optional
                      | SAML text_optional""")
    def p_command_text(self, p):
        p[0] = Command(p[1].upper(), argument=p[2])

    @_rule("""command : DATA no_args
                      | RSET no_args
                      | QUIT no_args
                      | STARTTLS no_args""")
    def p_command_bare(self, p):
        p[0] = Command(p[1].upper())

    @_rule("""command : MAIL SP mail_keyword COLON opt_sp path params""")
    def p_command_mail(self, p):
        if sanitize.has_unsafe(p[6]):
            raise _Fail("address")  # C1, line separators, bidi: a forged or hidden log text (issue 17 item 10)
        p[0] = Command("MAIL", address=p[6], params=p[7])

    @_rule("""command : RCPT SP rcpt_keyword COLON opt_sp path params""")
    def p_command_rcpt(self, p):
        if not p[6] or sanitize.has_unsafe(p[6]):
            raise _Fail("address")  # RCPT TO:<>; or C1, line separators, bidi (issue 17 item 10)
        p[0] = Command("RCPT", address=p[6], params=p[7])

    @_rule("""text_required : SP TEXT""")
    def p_text_required(self, p):
        p[0] = p[2].strip(" \t")

    @_rule("""text_optional : text_required""")
    def p_text_optional(self, p):
        p[0] = p[1]

    @_rule("""text_optional : no_args""")
    def p_text_optional_none(self, p):
        p[0] = None

    @_rule("""no_args : empty
                      | SP
       opt_sp : empty
              | SP""")
    def p_ignored(self, p):
        p[0] = None

    @_rule("""mail_keyword : WORD""")
    def p_mail_keyword(self, p):
        if p[1].upper() != "FROM":
            raise _Fail("args")

    @_rule("""rcpt_keyword : WORD""")
    def p_rcpt_keyword(self, p):
        if p[1].upper() != "TO":
            raise _Fail("args")

    @_rule("""path : LT GT""")
    def p_path_null(self, p):
        p[0] = ""

    @_rule("""path : LT route_mailbox GT""")
    def p_path_bracketed(self, p):
        p[0] = p[2]

    @_rule("""path : mailbox""")
    def p_path_bare(self, p):
        p[0] = p[1]

    @_rule("""route_mailbox : mailbox""")
    def p_route_mailbox_plain(self, p):
        p[0] = p[1]

    @_rule("""route_mailbox : source_route COLON mailbox""")
    def p_route_mailbox_routed(self, p):
        p[0] = p[3]  # RFC 5321 4.1.1.3 and C: accept the source route, then ignore it

    @_rule("""source_route : AT domain
                           | source_route COMMA AT domain""")
    def p_source_route(self, p):
        p[0] = None

    @_rule("""mailbox : local_part""")
    def p_mailbox_local(self, p):
        p[0] = p[1]  # "postmaster": whether a bare name is acceptable is the session's decision

    @_rule("""mailbox : local_part AT domain""")
    def p_mailbox_full(self, p):
        p[0] = normalize_address("%s@%s" % (p[1], p[3]))

    @_rule("""local_part : WORD
                         | QSTRING""")
    def p_local_part(self, p):
        # RFC 5321 Dot-string: specials such as ( ) ; \ only inside a quoted local part. Refusing them keeps
        # shell-looking senders like <a(b)c@x> out of the envelope instead of passing them on verbatim.
        if not p[1].startswith('"') and _SPECIALS.search(p[1]):
            raise _Fail("address")
        p[0] = p[1]

    @_rule("""domain : WORD""")
    def p_domain_name(self, p):
        if not _DOMAIN.fullmatch(p[1]):
            raise _Fail("address")
        p[0] = p[1]

    @_rule("""domain : LITERAL""")
    def p_domain_literal(self, p):
        if not _valid_literal(p[1][1:-1]):
            raise _Fail("address")
        p[0] = p[1]

    @_rule("""params : empty
                     | SP""")
    def p_params_none(self, p):
        p[0] = {}

    @_rule("""params : SP param_list
                     | SP param_list SP""")
    def p_params(self, p):
        p[0] = p[2]

    @_rule("""param_list : param""")
    def p_param_list_first(self, p):
        p[0] = dict([p[1]])

    @_rule("""param_list : param_list SP param""")
    def p_param_list_more(self, p):
        key, value = p[3]
        if key in p[1]:
            raise _Fail("args")  # the same parameter twice
        p[1][key] = value
        p[0] = p[1]

    @_rule("""param : WORD""")
    def p_param_flag(self, p):
        p[0] = (_esmtp_keyword(p[1]), None)

    @_rule("""param : WORD EQUALS value""")
    def p_param_value(self, p):
        if not _ESMTP_VALUE.fullmatch(p[3]):
            raise _Fail("args")
        p[0] = (_esmtp_keyword(p[1]), p[3])

    @_rule("""value : value_piece
                    | value value_piece""")
    def p_value(self, p):
        p[0] = p[1] if len(p) == 2 else p[1] + p[2]

    @_rule("""value_piece : WORD
                          | LT
                          | GT
                          | AT
                          | COMMA
                          | COLON
                          | QSTRING
                          | LITERAL""")
    def p_value_piece(self, p):
        p[0] = p[1]

    @_rule("""empty :""")
    def p_empty(self, p):
        p[0] = None

    def p_error(self, tok):
        if tok is None:
            raise _Fail("eof")
        phase = getattr(tok, "phase", None)
        raise _Fail("address" if phase == _ADDRESS else "args")


def _esmtp_keyword(word: str) -> str:
    if not _ESMTP_KEYWORD.fullmatch(word):
        raise _Fail("args")
    return word.upper()


def _valid_literal(inner: str) -> bool:
    """RFC 5321 4.1.3 address literals: IPv4, ``IPv6:...``, or a general ``tag:content``."""
    try:
        if _IPV4.fullmatch(inner):
            ipaddress.IPv4Address(inner)
            return True
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
            return True
    except ValueError:
        return False
    return bool(_GENERAL_LITERAL.fullmatch(inner))


def _build():
    tokens = _Tokens()
    lexer = lex.lex(module=tokens, optimize=False, reflags=int(re.VERBOSE | re.DOTALL), errorlog=lex.NullLogger())
    parser = yacc.yacc(module=_Grammar(), start="command", write_tables=False, debug=False,
                       errorlog=yacc.NullLogger())
    return lexer, parser


_LEXER, _PARSER = _build()
_local = threading.local()


def _thread_parser():
    """This thread's (lexer, parser): a lexer clone and a parser object sharing the read-only LR tables."""
    pair = getattr(_local, "pair", None)
    if pair is None:
        pair = (_LEXER.clone(), copy.copy(_PARSER))
        _local.pair = pair
    return pair


def parse_command(line: str) -> Command:
    """Parse one SMTP command line; raise ``SmtpSyntaxError`` carrying the reply for the client."""
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return _parse_cached(line)


@functools.lru_cache(maxsize=4096)
def _parse_cached(line: str) -> Command:
    # Most lines repeat (DATA, QUIT, a client's EHLO, a list's MAIL FROM): the same line always parses to
    # the same frozen Command, so a bounded cache saves the LALR run. Errors are never cached.
    return _parse(line)


def _parse(line: str) -> Command:
    lexer, parser = _thread_parser()
    lexer.begin("INITIAL")
    lexer.verb = None
    lexer.phase = _KEYWORD
    lexer.depth = 0
    lexer.addr_seen = False
    try:
        return parser.parse(line, lexer=lexer)
    except _Fail as fail:
        raise SmtpSyntaxError(_reply_for(fail.kind, lexer)) from None


def _reply_for(kind: str, lexer) -> Reply:
    verb = lexer.verb
    if kind == "verb" or verb is None:
        return replies.UNKNOWN_COMMAND
    if kind == "eof":
        # the line ended early: inside the address it is the address that is incomplete
        kind = "address" if verb in ("MAIL", "RCPT") and lexer.phase == _ADDRESS else "args"
    if kind == "address":
        return BAD_SENDER_SYNTAX if verb == "MAIL" else BAD_RECIPIENT_SYNTAX
    return Reply(501, "5.5.4", "Syntax: %s" % _USAGE.get(verb, verb))

