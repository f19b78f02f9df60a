"""``pmaster passwd [-c FILE] [--file PATH] [--delete] USER``: add, replace or delete a user of a password file.

API: ``main(args) -> int`` (called by ``cli``), ``webadmin_password_file(config_path) -> Optional[str]``.
Invariants: the password comes from stdin (asked twice with ``getpass`` on a terminal, else the first line without
  its line end); it is never echoed, logged or passed in argv. The default file is ``[webadmin] password-file``, read
  from the configuration's own text so that it works whether or not this version supports ``[webadmin]``.
Errors: ``PmasterError`` with one line (no file given and none configured, mismatched or empty password, a file that
  cannot be read or written); ``cli`` prints it.
"""

import argparse
import getpass
import os
import sys
from typing import Optional

from pmaster.errors import PmasterError
from pmaster.grammar import cf
from pmaster.passwords import check_user_name, delete_user, set_password


def webadmin_password_file(config_path: str) -> Optional[str]:
    """``[webadmin] password-file`` as written (relative to the configuration's directory), or None."""
    try:
        with open(config_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        raise PmasterError("cannot read configuration %s: %s" % (config_path, exc.strerror or exc)) from None
    items, _ = cf.parse(text, config_path)
    in_webadmin = False
    for item in items:
        if isinstance(item, cf.Header):
            in_webadmin = item.kind.lower() == "webadmin"
        elif in_webadmin and item.key.text == "password-file" and len(item.values) == 1 and item.values[0].text:
            basedir = os.path.dirname(os.path.abspath(config_path))
            return os.path.normpath(os.path.join(basedir, item.values[0].text))
    return None


def read_password(stdin=None) -> str:
    stdin = stdin or sys.stdin
    if stdin.isatty():
        first = getpass.getpass("New password: ")
        if getpass.getpass("Retype new password: ") != first:
            raise PmasterError("passwd: the passwords do not match; nothing changed")
        password = first
    else:
        password = stdin.readline()
        if password.endswith("\n"):
            password = password[:-1]
        if password.endswith("\r"):
            password = password[:-1]
    if not password:
        raise PmasterError("passwd: empty password; nothing changed")
    return password


def main(args: argparse.Namespace) -> int:
    path = args.file or webadmin_password_file(args.config)
    if not path:
        raise PmasterError("passwd: no [webadmin] password-file in %s; name the file with --file PATH" % args.config)
    check_user_name(args.user)
    if args.delete:
        if not delete_user(path, args.user):
            raise PmasterError("passwd: no user %r in %s" % (args.user, path))
        return 0
    set_password(path, args.user, read_password())
    return 0
