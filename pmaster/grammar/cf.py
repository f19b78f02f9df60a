"""The configuration language: PLY lexer and grammar producing a flat list of headers and statements.

API: ``parse(text, filename) -> (items, diagnostics)``. ``items`` is a list of ``Header`` and ``Statement``
  values in file order; ``diagnostics`` lists every lexical and syntax error as ``Diagnostic`` (1-based
  line and column). The parser recovers at the next line, so one run reports every bad line.
Invariants: actions only build values; meaning (which keys exist, what a value converts to) belongs to
  ``pmaster.config``. The lexer and parser tables are built once; each ``parse`` call clones the lexer and
  takes the parser lock, so threads may parse concurrently.
Lexical rules (SPEC section 2): ``#`` or ``//`` at the start of a token begins a comment; ``=`` after the
  key separates it from the value, but inside a value word it is text (``--to=${RCPT_TO}``); ``[`` at the
  start of a line opens a section header (elsewhere it belongs to a word such as ``[::1]:25``); a trailing
  ``,`` continues the statement on the next line, even when a comment follows it; ``relay(...)`` and
  ``pipe(...)`` are single tokens whose parentheses must balance on that line.
Errors: grammar rules live in docstrings, so ``python -OO`` cannot build the parser; ``_build`` says so.
"""

import re
import threading
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import ply.lex as lex
import ply.yacc as yacc

from pmaster.errors import Diagnostic


@dataclass(frozen=True)
class Value:
    kind: str  # "word", "string" or "call"
    text: str  # the word, the unescaped string, or the whole call text "relay(a, b)"
    line: int
    col: int
    comma_before: bool = False


@dataclass(frozen=True)
class Header:
    kind: str
    ident: Optional[str]
    line: int
    col: int
    ident_col: int = 0


@dataclass(frozen=True)
class Statement:
    key: Value
    values: Tuple[Value, ...]
    line: int
    col: int


Item = Union[Header, Statement]


class _Lexer:
    """Token rules; an instance is the ``module=`` object PLY builds the lexer from."""

    tokens = ("NEWLINE", "LBRACKET", "RBRACKET", "EQUALS", "COMMA", "STRING", "WORD", "CALL", "BAD")

    t_ignore = " \t\r\f\v"

    _WORD = re.compile(r"(?:[^\s\[\]=,\"()]|\[[^\]\s\[]*\])(?:[^\s\[\],\"()]|\[[^\]\s\[]*\])*")
    _CALL_NAME = re.compile(r"(?:relay|pipe)\(")

    def __init__(self) -> None:
        self.diagnostics: List[Diagnostic] = []
        self.filename = ""

    # Rule functions are tried in definition order: comments first, so '#' and '//' start one only at a
    # token's start; CALL before WORD, so 'relay(' is never read as a word.

    def t_COMMENT(self, t):
        r"(?:\#|//)[^\n]*"
        return None

    def t_COMMA(self, t):
        r",(?:[ \t\r]*(?:(?:\#|//)[^\n]*)?\n)*"
        t.lexer.lineno += t.value.count("\n")
        t.lexer.at_bol = False
        t.lexer.comma = (t.lexpos, t.lexer.lexpos)  # for p_error: a comma that ends the file
        t.value = ","
        return t

    def t_NEWLINE(self, t):
        r"\n"
        t.lexer.lineno += 1
        t.lexer.at_bol = True
        return t

    def t_LBRACKET(self, t):
        r"\["
        if t.lexer.at_bol:
            t.lexer.at_bol = False
            t.lexer.in_header = True
            return t
        # Not at the start of a line: part of a word like [::1]:25.
        m = self._WORD.match(t.lexer.lexdata, t.lexpos)
        if not m or m.end() == t.lexpos:
            return self._bad(t, "unexpected '['", to_eol=False)
        t.type = "WORD"
        t.value = m.group()
        t.lexer.lexpos = m.end()
        return t

    def t_RBRACKET(self, t):
        r"\]"
        t.lexer.at_bol = False
        t.lexer.in_header = False
        return t

    def t_EQUALS(self, t):
        r"="
        t.lexer.at_bol = False
        return t

    def t_STRING(self, t):
        r'"(?:[^"\\\n]|\\.)*"'
        t.lexer.at_bol = False
        t.value = _unescape(t.value[1:-1])
        return t

    def t_CALL(self, t):
        r"(?:relay|pipe)\("
        t.lexer.at_bol = False
        data = t.lexer.lexdata
        depth = 1
        i = t.lexer.lexpos
        while i < len(data) and data[i] != "\n":
            if data[i] == "(":
                depth += 1
            elif data[i] == ")":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        if depth != 0:
            return self._bad(t, "unbalanced parentheses: expected ')' to close '%s'" % t.value, to_eol=True)
        t.value = data[t.lexpos:i + 1]
        t.lexer.lexpos = i + 1
        return t

    def t_WORD(self, t):
        r"(?:[^\s\[\]=,\"()]|\[[^\]\s\[]*\])(?:[^\s\[\],\"()]|\[[^\]\s\[]*\])*"
        # '=' inside a value word is text (exec = /usr/bin/deliver --to=${RCPT_TO}); in the key, the first
        # word of a line, it separates the key from the value (workers=5).
        if t.lexer.at_bol and "=" in t.value:
            t.value = t.value[:t.value.index("=")]
            t.lexer.lexpos = t.lexpos + len(t.value)
        t.lexer.at_bol = False
        return t

    def t_error(self, t):
        ch = t.value[0]
        if ch == '"':
            return self._bad(t, "unterminated string: expected a closing '\"'", to_eol=True)
        return self._bad(t, "unexpected character %r" % ch, to_eol=False)

    def _bad(self, t, message: str, to_eol: bool):
        lexer = t.lexer
        self.diagnostics.append(_diag(self.filename, lexer.lexdata, t.lexpos, message))
        if to_eol:
            end = lexer.lexdata.find("\n", t.lexpos)
            lexer.lexpos = len(lexer.lexdata) if end < 0 else end
        else:
            lexer.lexpos = t.lexpos + 1
        lexer.at_bol = False
        t.type = "BAD"
        t.value = lexer.lexdata[t.lexpos:lexer.lexpos]
        return t


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def _column(data: str, pos: int) -> int:
    return pos - data.rfind("\n", 0, pos)


def _line(data: str, pos: int) -> int:
    return data.count("\n", 0, pos) + 1


def _diag(filename: str, data: str, pos: int, message: str, severity: str = "error") -> Diagnostic:
    return Diagnostic(filename, _line(data, pos), _column(data, pos), severity, message)


class _Grammar:
    """Grammar rules; an instance is the ``module=`` object PLY builds the parser from."""

    tokens = _Lexer.tokens
    start = "config"

    def __init__(self) -> None:
        self.state: Optional[_ParseState] = None

    def p_config(self, p):
        """config : lines"""
        p[0] = p[1]

    def p_lines_empty(self, p):
        """lines :"""
        p[0] = None

    def p_lines_more(self, p):
        """lines : lines line"""
        p[0] = None

    def p_line_blank(self, p):
        """line : NEWLINE"""

    def p_line_header(self, p):
        """line : header NEWLINE"""
        self.state.items.append(p[1])

    def p_line_statement(self, p):
        """line : statement NEWLINE"""
        if p[1] is not None:
            self.state.items.append(p[1])

    def p_line_error(self, p):
        """line : error NEWLINE"""
        p.parser.errok()

    def p_header_plain(self, p):
        """header : LBRACKET WORD RBRACKET"""
        p[0] = Header(p[2], None, p.lineno(1), self._col(p, 1), 0)

    def p_header_ident(self, p):
        """header : LBRACKET WORD WORD RBRACKET
                  | LBRACKET WORD STRING RBRACKET"""
        p[0] = Header(p[2], p[3], p.lineno(1), self._col(p, 1), self._col(p, 3))

    def p_statement(self, p):
        """statement : key values"""
        p[0] = Statement(p[1], tuple(p[2]), p[1].line, p[1].col)

    def p_statement_equals(self, p):
        """statement : key EQUALS values"""
        p[0] = Statement(p[1], tuple(p[3]), p[1].line, p[1].col)

    def p_statement_novalue(self, p):
        """statement : key
                     | key EQUALS"""
        key = p[1]
        self.state.error(key.line, key.col, "expected a value after '%s'" % key.text)
        p[0] = None

    def p_key(self, p):
        """key : WORD
               | STRING"""
        kind = "word" if p.slice[1].type == "WORD" else "string"
        p[0] = Value(kind, p[1], p.lineno(1), self._col(p, 1))

    def p_values_one(self, p):
        """values : value"""
        p[0] = [p[1]]

    def p_values_more(self, p):
        """values : values value"""
        p[0] = p[1] + [p[2]]

    def p_values_comma(self, p):
        """values : values COMMA value"""
        v = p[3]
        p[0] = p[1] + [Value(v.kind, v.text, v.line, v.col, True)]

    def p_value(self, p):
        """value : WORD
                 | STRING
                 | CALL"""
        kind = {"WORD": "word", "STRING": "string", "CALL": "call"}[p.slice[1].type]
        p[0] = Value(kind, p[1], p.lineno(1), self._col(p, 1))

    def p_error(self, t):
        state = self.state
        if t is None:
            start, end = state.lexer.comma
            if start >= 0 and not state.data[end:].strip():
                state.error_at(start, "expected a value after ','")  # the continued line never came
                return
            state.error_at(len(state.data), "unexpected end of file")
            return
        if t.type == "BAD":
            return  # the lexer has reported it
        expected = {
            "NEWLINE": "unexpected end of line",
            "RBRACKET": "unexpected ']'",
            "EQUALS": "unexpected '='",
            "COMMA": "unexpected ','",
            "LBRACKET": "unexpected '['",
        }.get(t.type)
        if state.in_header(t):
            message = "bad section header: expected [kind], [kind name] or [kind \"name\"]"
        elif t.type == "COMMA" or (t.type == "NEWLINE" and state.after_comma(t)):
            message = "expected a value after ','"
        elif expected:
            message = expected
        else:
            message = "unexpected %r: a statement is 'key = value ...' and targets are separated by ','" % t.value
        state.error_at(t.lexpos, message)

    def _col(self, p, i) -> int:
        return _column(self.state.data, p.lexpos(i))


class _ParseState:
    def __init__(self, data: str, filename: str, diagnostics: List[Diagnostic], lexer=None):
        self.data = data
        self.lexer = lexer
        self.filename = filename
        self.items: List[Item] = []
        self.diagnostics = diagnostics

    def error(self, line: int, col: int, message: str) -> None:
        self.diagnostics.append(Diagnostic(self.filename, line, col, "error", message))

    def error_at(self, pos: int, message: str) -> None:
        self.diagnostics.append(_diag(self.filename, self.data, pos, message))

    def in_header(self, t) -> bool:
        line_start = self.data.rfind("\n", 0, t.lexpos) + 1
        return self.data[line_start:t.lexpos].lstrip().startswith("[")

    def after_comma(self, t) -> bool:
        return self.data[:t.lexpos].rstrip(" \t\r").endswith(",")


_lock = threading.Lock()
_built: Optional[Tuple[object, object, _Lexer, _Grammar]] = None


def _build():
    global _built
    if _built is None:
        if _Grammar.p_config.__doc__ is None:
            raise RuntimeError("the configuration grammar needs docstrings: do not run pmaster under python -OO")
        lexmod = _Lexer()
        gram = _Grammar()
        lexer = lex.lex(module=lexmod, optimize=False, errorlog=lex.NullLogger())
        parser = yacc.yacc(module=gram, write_tables=False, debug=False, errorlog=yacc.NullLogger())
        _built = (lexer, parser, lexmod, gram)
    return _built


def parse(text: str, filename: str) -> Tuple[List[Item], List[Diagnostic]]:
    """Parse one configuration file's text; never raises for bad input."""
    if not text.endswith("\n"):
        text += "\n"
    diagnostics: List[Diagnostic] = []
    with _lock:
        base_lexer, parser, lexmod, gram = _build()
        lexer = base_lexer.clone()
        lexer.lineno = 1
        lexer.at_bol = True
        lexer.in_header = False
        lexer.comma = (-1, -1)
        lexmod.diagnostics = diagnostics
        lexmod.filename = filename
        state = _ParseState(text, filename, diagnostics, lexer)
        gram.state = state
        try:
            parser.parse(text, lexer=lexer)
        finally:
            gram.state = None
    diagnostics.sort(key=lambda d: (d.line, d.col))
    return state.items, diagnostics
