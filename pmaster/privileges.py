"""Dropping root: one place for the order of calls and what must be loaded before.

API: ``switch_to(uid, gid)``: clear supplementary groups, then set the gid, then the uid (-1 keeps it);
  raises ``OSError``. Before switching, codecs and modules that load lazily are loaded, because the new
  user may not be allowed to read the Python installation (one under /root, as on build machines).
"""

import codecs
import os

_LAZY_CODECS = ("ascii", "utf-8", "latin-1", "idna")


def preload() -> None:
    for name in _LAZY_CODECS:
        codecs.lookup(name)
    # Used later by bounces and the relay mailer, which may first run after the switch.
    import email.generator  # noqa: F401
    import email.mime.multipart  # noqa: F401
    import email.mime.text  # noqa: F401
    import email.parser  # noqa: F401
    import email.policy  # noqa: F401


def switch_to(uid: int, gid: int) -> None:
    preload()
    os.setgroups([])
    os.setgid(gid)
    if uid != -1:
        os.setuid(uid)
