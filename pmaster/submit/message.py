"""Header-block helpers shared by ``pmaster sendmail`` and the pickup: pure functions on bytes.

API: ``is_field_line(line)``, ``is_continuation(line)``, ``header_end(data) -> (offset, separated)``,
  ``field_names(head) -> Set[str]``, ``addresses(values) -> List[str]``.
Invariants: lines are given without their line end; names compare lower-cased. A header block ends at an empty
  line (``separated``) or at the first line that is neither a field nor a continuation (then a sender that
  follows RFC 5322 needs an empty line put there).
"""

import email.utils
import re
from typing import Iterable, List, Optional, Set, Tuple

_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


def is_field_line(line: bytes) -> bool:
    return _FIELD.match(line) is not None


def is_continuation(line: bytes) -> bool:
    return line[:1] in (b" ", b"\t")


def field_name(line: bytes) -> str:
    return line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def header_end(data: bytes, complete: bool) -> Tuple[Optional[int], bool]:
    """(offset where the header block of CRLF text ``data`` ends, whether an empty line ends it).

    The offset is that of the empty line or of the first line that is no header; None when ``data`` (not
    ``complete``) ends inside the header block.
    """
    pos, first = 0, True
    while True:
        nl = data.find(b"\r\n", pos)
        if nl < 0:
            if not complete:
                return None, False
            line = data[pos:]
            if not line:
                return pos, False
        else:
            line = data[pos:nl]
        if not line:
            return pos, True
        if not (is_field_line(line) or (not first and is_continuation(line))):
            return pos, False
        if nl < 0:
            return len(data), False
        first = False
        pos = nl + 2


def field_names(head: bytes) -> Set[str]:
    return {field_name(line) for line in head.split(b"\r\n") if is_field_line(line)}


def addresses(values: Iterable[str]) -> List[str]:
    """The addresses of address-list field values (or command-line words): groups and names dropped."""
    out = []
    for _name, addr in email.utils.getaddresses(list(values)):
        addr = addr.strip()
        if addr:
            out.append(addr)
    return out
