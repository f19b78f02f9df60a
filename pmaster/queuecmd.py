"""``pmaster queue``: list, show, flush, hold, release, delete and bounce queued messages.

API: ``main(args) -> int`` (argparse namespace from the CLI: ``config``, ``action``, ``id``, ``json``);
  ``perform(spool, config, action, qid) -> str`` (one action, its effect as a line: the CLI and the web admin).
Invariants: works whether or not the daemon runs. Every change is a read-modify-write of the envelope under
  the message lock, so it never races a delivery's result; after each change it touches ``<spool>/trigger``
  (``Spool.touch_trigger``), so a running daemon rescans the queue within about a second. ``flush``
  leaves held messages alone. Without a daemon, ``flush`` marks messages due now and ``bounce`` writes the
  report into the spool: both go out when the daemon starts (SPEC 9). ``bounce`` records the recipients as
  bounced and removes the message only once the report is stored (a null sender needs none).
Security: run by root on a spool that belongs to another user (the daemon's ``user-id``), it first becomes
  that user (uid and group of the spool directory, no supplementary groups), so every file it writes stays
  readable by the daemon; root-owned 0600 records would never be delivered.
Errors: an unknown id, a message that stays locked, an unreadable spool, a report that cannot be stored,
  a failed switch to the spool's owner: one line, exit 1 (via the CLI).
"""

import argparse
import datetime
import json
import os
import sys
import time
from typing import Dict, List, Optional

from pmaster import privileges, sanitize
from pmaster.config import Config, load
from pmaster.envelope import BOUNCED, PENDING, Envelope
from pmaster.errors import PmasterError, QueueIdError, SpoolError
from pmaster.routing import bounce_recipients
from pmaster.scheduler import send_bounce
from pmaster.spool import Spool, valid_queue_id

LOCK_WAIT = 30.0


def message_state(env: Envelope, now: float) -> str:
    if env.held:
        return "hold"
    due = [r.next_attempt for r in env.recipients if r.state == PENDING]
    if due and min(due) <= now:
        return "active"
    return "deferred"


def _iso(ts) -> str:
    if not ts:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_json(env: Envelope, now: float) -> Dict[str, object]:
    return {
        "id": env.queue_id,
        "state": message_state(env, now),
        "sender": env.sender,
        "size": env.size,
        "arrival": _iso(env.arrival),
        "recipients": [{
            "address": r.address,
            "original": r.original,
            "mailer": r.target,
            "state": r.state,
            "attempts": r.attempts,
            "last_reply": r.last_reply,
            # A recipient never tried has next_attempt 0: it has been due since arrival.
            "next_attempt": _iso(max(r.next_attempt, env.arrival)) if r.state == PENDING else None,
        } for r in env.recipients],
    }


def become_spool_owner(directory: str) -> None:
    """As root, become the owner of an existing spool that is not root's (uid, and the directory's group).

    Every file the CLI writes (records, envelopes, temp files, the trigger) must be readable by the daemon
    after it dropped to ``user-id``; Postfix's postqueue/postsuper likewise act as the mail system owner.
    """
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(directory)
    except OSError:
        return  # no spool yet: whoever creates it, the daemon hands it over at start
    if st.st_uid == 0:
        return
    try:
        privileges.switch_to(st.st_uid, st.st_gid)
    except OSError as exc:
        raise PmasterError("cannot switch to uid %d gid %d, the owner of spool %s: %s"
                           % (st.st_uid, st.st_gid, directory, exc.strerror or exc))


def _spool(config: Config) -> Spool:
    try:
        return Spool(config.core.spool_directory)
    except (OSError, SpoolError) as exc:
        raise PmasterError("cannot open spool %s: %s" % (config.core.spool_directory, exc))


def _envelopes(spool: Spool) -> List[Envelope]:
    out = []
    for qid in spool.ids():
        try:
            out.append(spool.load(qid))
        except QueueIdError:
            continue  # delivered and removed while we looked
        except SpoolError as exc:
            sys.stderr.write("pmaster: %s: %s (moved to corrupt/)\n" % (qid, exc))
    return out


def cmd_list(spool: Spool, args: argparse.Namespace) -> int:
    now = time.time()
    envs = _envelopes(spool)
    if args.json:
        print(json.dumps([as_json(e, now) for e in envs], indent=2))
        return 0
    if not envs:
        print("Mail queue is empty")
        return 0
    print("%-18s %9s  %-20s  %-8s  %s" % ("Queue ID", "Size", "Arrival", "State", "Sender/Recipients"))
    for env in envs:
        print("%-18s %9d  %-20s  %-8s  <%s>" % (env.queue_id, env.size, _iso(env.arrival), message_state(env, now),
                                               env.sender))
        for r in env.recipients:
            # Records written before texts were sanitized may still hold terminal controls (issue 17).
            extra = " (%s)" % sanitize.remote_text(r.last_reply) if r.last_reply and r.state != "sent" else ""
            print("%62s<%s> %s%s" % ("", r.address, r.state, extra))
    print("-- %d message%s" % (len(envs), "" if len(envs) == 1 else "s"))
    return 0


def cmd_show(spool: Spool, qid: str) -> int:
    env = spool.load(qid)
    print(json.dumps(as_json(env, time.time()), indent=2))
    print()
    with spool.open_body(qid) as f:
        for raw in f:
            if raw in (b"\r\n", b"\n"):
                break
            # A client wrote these headers: no escape sequence of theirs reaches the operator's terminal.
            sys.stdout.write(sanitize.remote_text(raw.decode("utf-8", "replace").rstrip("\r\n")) + "\n")
    return 0


def _change(spool: Spool, qid: str, fn) -> Envelope:
    if not valid_queue_id(qid) or not spool.exists(qid):
        raise QueueIdError("no message %s in the queue" % qid)
    with spool.lock(qid, timeout=LOCK_WAIT):
        env = spool.load(qid)
        fn(env)
        spool.save(env)
    spool.touch_trigger()
    return env


def _flush(env: Envelope) -> None:
    if env.held:
        return
    now = time.time()
    for r in env.recipients:
        if r.state == PENDING:
            r.next_attempt = now


def _hold(held: bool):
    def fn(env: Envelope) -> None:
        env.held = held
        if not held:
            _flush(env)
    return fn


def cmd_bounce(spool: Spool, config: Config, qid: str) -> int:
    print(bounce_message(spool, config, qid))
    return 0


def bounce_message(spool: Spool, config: Config, qid: str) -> str:
    """Return the pending recipients to the sender now; the effect as one line."""
    if not valid_queue_id(qid) or not spool.exists(qid):
        raise QueueIdError("no message %s in the queue" % qid)
    now = time.time()
    with spool.lock(qid, timeout=LOCK_WAIT):
        env = spool.load(qid)
        failed = [r for r in env.recipients if r.state == PENDING]
        for r in failed:
            r.state = BOUNCED
            r.last_reply = "message returned by the postmaster" + (" (last: %s)" % r.last_reply if r.last_reply else "")
            r.dsn_status = "5.0.0"
        # The report first: when it cannot be stored, the record on disk stays as it was (one line, exit 1),
        # so the report is never lost.
        try:
            report = send_bounce(spool, env, failed, config, bounce_recipients, now) if failed else None
        except SpoolError as exc:
            raise PmasterError("%s: cannot queue the non-delivery report, message left in the queue: %s" % (qid, exc))
        spool.save(env)
        spool.remove(qid)
    spool.touch_trigger()  # the daemon forgets the message and picks up the report
    return "%s: bounced %d recipient%s%s" % (qid, len(failed), "" if len(failed) == 1 else "s",
                                           "; report %s" % report if report else "")


ACTIONS = ("flush", "hold", "release", "delete", "bounce")


def perform(spool: Spool, config: Optional[Config], action: str, qid: str) -> str:
    """One action on one message, as ``pmaster queue ACTION ID`` and the web admin do it; the effect as one
    line. Raises ``QueueIdError`` for an unknown id, ``PmasterError`` for an unknown action."""
    if not valid_queue_id(qid):
        raise QueueIdError("no message %s in the queue" % qid)
    if action == "flush":
        env = _change(spool, qid, _flush)
        return "%s: %s" % (qid, "held: not flushed" if env.held else "flushed")
    if action in ("hold", "release"):
        _change(spool, qid, _hold(action == "hold"))
        return "%s: %s" % (qid, "held" if action == "hold" else "released")
    if action == "delete":
        if not spool.exists(qid):
            raise QueueIdError("no message %s in the queue" % qid)
        with spool.lock(qid, timeout=LOCK_WAIT):
            spool.remove(qid)
        spool.touch_trigger()
        return "%s: deleted" % qid
    if action == "bounce" and config is not None:
        return bounce_message(spool, config, qid)
    raise PmasterError("unknown queue action %r" % action)


def cmd_flush(spool: Spool, qid) -> int:
    """Mark pending recipients due now; held messages stay as they are. One bad record does not stop it."""
    spool.touch_flush()  # before the trigger: the daemon forgets refused hosts, then plans the flushed mail
    if qid:
        print(perform(spool, None, "flush", qid))
        return 0
    flushed = 0
    failed = 0
    for one in spool.ids():
        try:
            env = _change(spool, one, _flush)
        except QueueIdError:
            continue  # delivered and removed while we went through the queue
        except SpoolError as exc:
            sys.stderr.write("pmaster: %s\n" % exc)
            failed += 1
            continue
        flushed += 0 if env.held else 1
    print("flushed %d message%s" % (flushed, "" if flushed == 1 else "s"))
    return 1 if failed else 0


def main(args: argparse.Namespace) -> int:
    config = load(args.config)
    become_spool_owner(config.core.spool_directory)
    spool = _spool(config)
    action = args.action
    if action == "list":
        return cmd_list(spool, args)
    qid = getattr(args, "id", None)
    if qid is not None and not valid_queue_id(qid):
        raise QueueIdError("no message %s in the queue" % qid)
    if action == "show":
        return cmd_show(spool, qid)
    if action == "flush":
        return cmd_flush(spool, qid)
    if action in ("hold", "release", "delete", "bounce"):
        print(perform(spool, config, action, qid))
        return 0
    raise PmasterError("unknown queue action %r" % action)
