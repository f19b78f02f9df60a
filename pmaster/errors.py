"""Exception types, one per layer.

API: ``Diagnostic`` (a config problem at file:line:col), ``ConfigError`` (carries diagnostics),
``SmtpError`` (carries a ``Reply`` for the client), ``SpoolError`` and ``QueueIdError`` (storage),
``UsageError`` (a mistake on the command line).
Invariants: leaves of the import graph; they import nothing from pmaster but ``reply``.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

from pmaster.reply import Reply


class PmasterError(Exception):
    """Base of every error a user can cause; ``str()`` is one line fit for stderr."""


@dataclass(frozen=True)
class Diagnostic:
    """One problem in a configuration file; columns and lines are 1-based."""

    file: str
    line: int
    col: int
    severity: str  # "error" or "warning"
    message: str

    def __str__(self) -> str:
        return "%s:%d:%d: %s: %s" % (self.file, self.line, self.col, self.severity, self.message)

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


class ConfigError(PmasterError):
    """The configuration is invalid; ``diagnostics`` lists every problem found."""

    def __init__(self, diagnostics: Sequence[Diagnostic]):
        self.diagnostics: List[Diagnostic] = list(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))


class SmtpError(PmasterError):
    """Aborts the current SMTP command; the session loop sends ``reply`` to the client."""

    def __init__(self, reply: Reply):
        self.reply = reply
        super().__init__(str(reply))


class SpoolError(PmasterError):
    """A spool record could not be written or read."""


class QueueIdError(SpoolError):
    """No message with that queue id."""


class UsageError(PmasterError):
    """A command-line mistake (bad address, unknown table, ...)."""


class RouteError(PmasterError):
    """An address has no route; ``reply`` is what RCPT answers."""

    def __init__(self, reply: Reply, message: Optional[str] = None):
        self.reply = reply
        super().__init__(message or reply.text)
