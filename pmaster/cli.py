"""Command-line front: ``pmaster run | check | route | queue | passwd | deliver | sendmail``.

API: ``main(argv=None) -> int`` (the ``pmaster`` console script).
Invariants: the one place that prints for users. Every error a user can cause is one line on stderr,
  ``pmaster: ...`` (or the ``FILE:LINE:COL: error: ...`` lines of a bad configuration), and a non-zero exit:
  never a traceback. Exit codes: 0 success, 1 failure the command reports (invalid file, no route, ...),
  2 usage errors; ``deliver`` and ``sendmail`` follow sysexits. Started under the name ``sendmail`` or ``mailq``
  (a symlink), pmaster is ``pmaster sendmail`` (``mailq``: ``-bp``).
"""

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional

from pmaster import __version__
from pmaster.config import DEFAULT_CONFIG, load, load_with_diagnostics
from pmaster.errors import ConfigError, PmasterError


def default_config() -> str:
    return os.environ.get("PMASTER_CONFIG") or DEFAULT_CONFIG


def _err(message: str) -> None:
    sys.stderr.write("pmaster: %s\n" % message)


def _print_diagnostics(diags) -> None:
    for d in diags:
        sys.stderr.write("%s\n" % d)


# -- check


def cmd_check(args: argparse.Namespace) -> int:
    from pmaster.routing import static_check

    config, diags = load_with_diagnostics(args.config, machine=False)
    if config is not None:
        diags = sorted(list(diags) + static_check(config), key=lambda d: (d.file, d.line, d.col))
    _print_diagnostics(diags)
    return 1 if config is None or any(d.is_error for d in diags) else 0


# -- route


def cmd_route(args: argparse.Namespace) -> int:
    from pmaster.routing import Router, route_one

    config = load(args.config)
    if args.table is not None and args.table not in config.routes:
        raise PmasterError("no routing table %r (known: %s)"
                           % (args.table, ", ".join(sorted(t for t in config.routes if t)) or "none"))
    router = Router(config)
    failed = False
    results = []
    for address in args.address:
        targets, refusal = route_one(router, address, args.table)
        if refusal is not None:
            failed = True
            if not args.json:
                print("%s: %s" % (address.strip().strip("<>"), refusal))
            continue
        for t in targets:
            results.append(t.as_json())
            if not args.json:
                print(t.describe())
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


# -- deliver


def cmd_deliver(argv: List[str]) -> int:
    from pmaster import maildir

    return maildir.main(argv)


# -- run, queue


def cmd_run(args: argparse.Namespace) -> int:
    from pmaster import daemon

    return daemon.run(args.config, detach=args.daemon)


def cmd_queue(args: argparse.Namespace) -> int:
    from pmaster import queuecmd

    return queuecmd.main(args)


def cmd_passwd(args: argparse.Namespace) -> int:
    from pmaster import passwdcmd

    return passwdcmd.main(args)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=default_config(),
                        help="configuration file (default: $PMASTER_CONFIG or %s)" % DEFAULT_CONFIG)
    p = argparse.ArgumentParser(prog="pmaster", description="Postmaster mail transfer agent")
    p.add_argument("--version", action="version", version="pmaster %s" % __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", parents=[common], help="start the daemon")
    run.add_argument("--daemon", action="store_true", help="fork, detach and write the pid file")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", parents=[common], help="validate the configuration")
    check.set_defaults(func=cmd_check)

    route = sub.add_parser("route", parents=[common], help="show where addresses go")
    route.add_argument("--table", help="routing table (default: the unnamed [route])")
    route.add_argument("--json", action="store_true", help="print JSON")
    route.add_argument("address", nargs="+")
    route.set_defaults(func=cmd_route)

    queue = sub.add_parser("queue", parents=[common], help="inspect and manage the queue")
    qsub = queue.add_subparsers(dest="action", metavar="ACTION")
    qsub.required = True
    qlist = qsub.add_parser("list", help="list queued messages")
    qlist.add_argument("--json", action="store_true")
    for name, helptext in (("show", "show one message"), ("hold", "hold a message"),
                           ("release", "release a held message"), ("delete", "delete a message"),
                           ("bounce", "bounce a message to its sender now")):
        qsub.add_parser(name, help=helptext).add_argument("id")
    qsub.add_parser("flush", help="retry deferred messages now").add_argument("id", nargs="?")
    queue.set_defaults(func=cmd_queue)

    sub.add_parser("deliver", help="local delivery into Maildirs (reads the message on stdin)", add_help=False)
    sub.add_parser("sendmail", help="sendmail(1)-compatible local submission (as sendmail and mailq too)",
                   add_help=False)

    passwd = sub.add_parser("passwd", parents=[common],
                            help="add, replace or delete a user of a password file (reads the password on stdin)")
    passwd.add_argument("--file", help="password file (default: [webadmin] password-file)")
    passwd.add_argument("--delete", action="store_true", help="delete the user")
    passwd.add_argument("user")
    passwd.set_defaults(func=cmd_passwd)
    return p


def cmd_sendmail(argv: List[str], prog: str) -> int:
    from pmaster.submit import sendmail

    return sendmail.main(argv, prog)


def main(argv: Optional[List[str]] = None) -> int:
    if not sys.warnoptions:
        # A library's deprecation notice (cryptography on an old Python) is not a line for mail admins.
        warnings.simplefilter("ignore")
    name = os.path.basename(sys.argv[0]) if argv is None and sys.argv else ""
    argv = list(sys.argv[1:] if argv is None else argv)
    if name in ("sendmail", "mailq"):
        # A symlink /usr/sbin/sendmail -> pmaster: cron, PHP and mailx call it with sendmail's options.
        return cmd_sendmail(argv, name)
    if argv and argv[0] == "sendmail":
        return cmd_sendmail(argv[1:], "pmaster sendmail")
    if argv and argv[0] == "deliver":
        return cmd_deliver(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        _print_diagnostics([d for d in exc.diagnostics if d.is_error] or exc.diagnostics)
        return 1
    except PmasterError as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
