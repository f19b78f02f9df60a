"""Trace header helpers for the anti-spam checks: folding, and removal of forged Authentication-Results.

API:
  ``fold(name, value) -> str``: ``"Name: value"`` folded at spaces to lines of at most 78 characters
     (RFC 5322 2.2.3), continuation lines starting with a tab, joined by CRLF, no final CRLF.
  ``header_safe(text, limit=200) -> str``: text from a client or from DNS made fit for a header value or a
     reply line (control characters replaced, length capped).
  ``authserv_id(value) -> str``: the authserv-id of an ``Authentication-Results:`` field value (RFC 8601
     2.2), lower case, comments skipped; "" when there is none.
  ``strip_ours(head, authserv_id) -> bytes``: the header block ``head`` (complete lines, CRLF ends) without
     the ``Authentication-Results:`` fields, continuation lines included, whose authserv-id is ours.
Invariants: pure functions; ``strip_ours`` leaves every other byte of the block as it was.
Threading: no state.
Errors: none; a field that cannot be parsed is kept (it cannot claim our authserv-id).
"""

import re
from typing import List

MAX_LINE = 78
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_AR_NAME = re.compile(rb"authentication-results[ \t]*:", re.IGNORECASE)


def header_safe(text: str, limit: int = 200) -> str:
    return _CONTROL.sub("?", text[:limit])


def fold(name: str, value: str) -> str:
    words = value.split(" ")
    lines: List[str] = []
    line = name + ":"
    for word in words:
        if not word:
            continue
        if len(line) + 1 + len(word) > MAX_LINE and line.strip() not in (name + ":", ""):
            lines.append(line)
            line = "\t" + word
        else:
            line += " " + word
    lines.append(line)
    return "\r\n".join(lines)


def _skip_cfws(text: str) -> str:
    """``text`` without leading white space and (possibly nested) comments (RFC 5322 3.2.2)."""
    text = text.lstrip()
    for _ in range(len(text)):  # each round consumes at least one character
        if not text.startswith("("):
            return text
        depth = 0
        for i, ch in enumerate(text):
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    text = text[i + 1:].lstrip()
                    break
        else:
            return ""  # an unclosed comment: no authserv-id
    return text


def authserv_id(value: str) -> str:
    rest = _skip_cfws(value.replace("\r", " ").replace("\n", " ").replace("\t", " "))
    m = re.match(r'"([^"]*)"|([^\s;()]+)', rest)
    if not m:
        return ""
    return (m.group(1) if m.group(1) is not None else m.group(2)).lower().rstrip(".")


def strip_ours(head: bytes, ours: str) -> bytes:
    ours = ours.lower().rstrip(".")
    lines = head.split(b"\r\n")
    out: List[bytes] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        j = i + 1
        while j < len(lines) and lines[j][:1] in (b" ", b"\t"):
            j += 1  # continuation lines belong to the field above
        m = _AR_NAME.match(line)
        if m:
            value = b"\r\n".join([line[m.end():]] + lines[i + 1:j]).decode("utf-8", "replace")
            if authserv_id(value) == ours:
                i = j
                continue
        out.extend(lines[i:j])
        i = j
    return b"\r\n".join(out)
