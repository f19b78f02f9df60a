"""Make text from remote peers safe to store and log (issue 17 item 10).

API:
  ``remote_text(text) -> str``: what a remote peer said (an SMTP reply, a pipe's stderr, a policy or verify
    answer), ready for the log, ``last_reply`` and the DSN: CR, LF and TAB become spaces; every other C0
    control, DEL, C1 control, U+2028/U+2029 and bidirectional formatting character becomes ``?`` (Postfix's
    ``printable()`` does the same with ``?``); at most ``MAX_TEXT`` characters are kept.
  ``has_unsafe(text) -> bool``: whether ``text`` holds a C1 control, U+2028/U+2029 or a bidi control: what the
    SMTP grammar refuses in HELO names and addresses (C0 controls it refuses already).
Invariants: printable text, UTF-8 included, passes unchanged; the result never contains a character that a
  terminal or log viewer interprets (escape sequences, bell, carriage return, reordering), so a peer can
  neither forge a log line nor hide text from the reader.
Threading: pure functions.
"""

import re

MAX_TEXT = 4096  # characters of one stored reply; more is a peer filling the queue's records

# Bidirectional formatting characters: ALM, LRM, RLM, LRE..RLO (embeddings and overrides), LRI..PDI (isolates).
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_SEPARATORS = "\u2028\u2029"
_UNSAFE = re.compile("[\x80-\x9f%s%s]" % (_SEPARATORS, _BIDI))
_SPACES = re.compile(r"[\r\n\t]")
_REPLACED = re.compile("[\x00-\x1f\x7f-\x9f%s%s]" % (_SEPARATORS, _BIDI))


def remote_text(text: str) -> str:
    """``text`` with controls neutralised and its length bounded (see the module docstring)."""
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + "..."
    return _REPLACED.sub("?", _SPACES.sub(" ", text))


def has_unsafe(text: str) -> bool:
    return _UNSAFE.search(text) is not None
