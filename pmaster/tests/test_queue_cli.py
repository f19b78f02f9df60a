"""``pmaster queue``: list, show, flush, hold, release, delete, bounce, as a real subprocess on a real spool,
with and without a running daemon (SPEC sections 1 and 9)."""

import datetime
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from pmaster.envelope import Envelope, Recipient
from pmaster.spool import Spool
from pmaster.tests.daemon_fixture import REPO, DaemonProcess, wait_for
from pmaster.tests.dnsserver import DnsServer

CONFIG = """\
[core]
  hostname = mx.cli.test
  spool-directory = {spool}
  pid-file = {tmp}/pmaster.pid
  retry-min = 1h
  retry-max = 2h
  dns-server = 127.0.0.1:{dns}

[smtpd cli]
  listen-port = 127.0.0.1:{port}

[route]
  @x.test pipe(cat > {tmp}/out-$QUEUE_ID.eml)
  @sender.test pipe(cat > {tmp}/bounce-$QUEUE_ID.eml)
"""

BODY = b"From: <a@sender.test>\r\nSubject: queued\r\nMessage-ID: <q1@sender.test>\r\n\r\nhello\r\n"


@pytest.fixture
def dns():
    with DnsServer({"sender.test": {"A": ["127.0.0.1"]}}, zones=("test",)) as server:
        yield server


class Queue:
    """A configuration and its spool; ``run(...)`` is ``pmaster queue -c CFG ...`` in a subprocess."""

    def __init__(self, tmp_path, dns):
        self.daemon = DaemonProcess(tmp_path, CONFIG, values={"dns": dns.address[1]},
                                    env={"PMASTER_DRAIN_SECONDS": "2"})
        self.tmp = str(tmp_path)
        self.spool = Spool(self.daemon.spool_dir)

    def run(self, *args):
        env = dict(os.environ, PYTHONPATH=REPO)
        return subprocess.run([sys.executable, "-m", "pmaster", "queue", "-c", self.daemon.config_path] + list(args),
                              capture_output=True, text=True, timeout=30, env=env)

    def run_limited(self, max_file_size, *args):
        """``run`` in a process whose files may not grow past ``max_file_size`` bytes (a full disk, for root)."""
        code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                "resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d)); from pmaster.cli import main; "
                "sys.exit(main(sys.argv[1:]))" % (max_file_size, max_file_size))
        env = dict(os.environ, PYTHONPATH=REPO)
        return subprocess.run([sys.executable, "-c", code, "queue", "-c", self.daemon.config_path] + list(args),
                              capture_output=True, text=True, timeout=30, env=env)

    def inject(self, rcpts=("bob@x.test",), sender="a@sender.test", next_attempt=0.0, held=False,
               attempts=0, last_reply="", body=BODY) -> str:
        now = time.time()
        recipients = [Recipient(address=a, original=a, mailer="pipe", target="pipe(cat > %s/out-$QUEUE_ID.eml)"
                                % self.tmp, next_attempt=next_attempt, attempts=attempts, last_reply=last_reply)
                      for a in rcpts]
        with self.spool.writer() as w:
            w.write(body)
            w.commit(Envelope(queue_id=w.queue_id, sender=sender, recipients=recipients, arrival=now,
                              size=len(body), held=held))
        return w.queue_id

    def listing(self):
        out = self.run("list", "--json")
        assert out.returncode == 0, out.stderr
        return {m["id"]: m for m in json.loads(out.stdout)}

    def delivered(self):
        return sorted(n for n in os.listdir(self.tmp) if n.startswith("out-"))


@pytest.fixture
def q(tmp_path, dns):
    queue = Queue(tmp_path, dns)
    yield queue
    queue.daemon.stop()


def later() -> float:
    return time.time() + 3600


def test_list_json_has_the_documented_shape(q):
    qid = q.inject(rcpts=("bob@x.test", "carol@x.test"), next_attempt=later(), attempts=1,
                   last_reply="451 4.3.0 later")
    m = q.listing()[qid]
    assert set(m) >= {"id", "state", "sender", "size", "arrival", "recipients"}
    assert (m["state"], m["sender"], m["size"]) == ("deferred", "a@sender.test", len(BODY))
    arrival = datetime.datetime.fromisoformat(m["arrival"].replace("Z", "+00:00"))
    assert abs(arrival.timestamp() - time.time()) < 60
    r = m["recipients"][0]
    assert set(r) >= {"address", "state", "attempts", "last_reply", "next_attempt"}
    assert (r["address"], r["state"], r["attempts"], r["last_reply"]) == ("bob@x.test", "pending", 1,
                                                                          "451 4.3.0 later")
    due = datetime.datetime.fromisoformat(r["next_attempt"].replace("Z", "+00:00"))
    assert 3500 < due.timestamp() - time.time() < 3700


def test_list_json_states_active_deferred_and_hold(q):
    active = q.inject()
    deferred = q.inject(next_attempt=later())
    held = q.inject(held=True)
    listing = q.listing()
    assert [listing[i]["state"] for i in (active, deferred, held)] == ["active", "deferred", "hold"]
    assert listing[active]["recipients"][0]["next_attempt"]  # due since arrival: an ISO time, not empty


def test_list_text_and_empty_queue(q):
    out = q.run("list")
    assert out.returncode == 0 and "empty" in out.stdout.lower()
    qid = q.inject()
    out = q.run("list")
    assert out.returncode == 0 and qid in out.stdout and "bob@x.test" in out.stdout


def test_show_prints_envelope_and_headers(q):
    qid = q.inject()
    out = q.run("show", qid)
    assert out.returncode == 0
    assert '"id": "%s"' % qid in out.stdout and "Subject: queued" in out.stdout and "hello" not in out.stdout


@pytest.mark.parametrize("action", ["show", "hold", "release", "delete", "bounce", "flush"])
def test_unknown_id_is_one_line_on_stderr_and_exit_1(q, action):
    for qid in ("0000000000000NOPE0", "../../etc/passwd"):
        out = q.run(action, qid)
        assert out.returncode == 1, (action, out)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
        assert out.stderr.startswith("pmaster: ")


def test_delete_removes_the_message(q):
    qid = q.inject()
    assert q.run("delete", qid).returncode == 0
    assert not q.spool.exists(qid) and q.listing() == {}


def test_hold_and_release_change_the_state(q):
    qid = q.inject(next_attempt=later())
    assert q.run("hold", qid).returncode == 0
    assert q.listing()[qid]["state"] == "hold"
    assert q.run("release", qid).returncode == 0
    assert q.listing()[qid]["state"] == "active"  # release makes it due now


def test_flush_without_daemon_marks_due_now_and_leaves_held_alone(q):
    waiting = q.inject(next_attempt=later())
    held = q.inject(next_attempt=later(), held=True)
    out = q.run("flush")
    assert out.returncode == 0, out.stderr
    listing = q.listing()
    assert listing[waiting]["state"] == "active"
    assert q.spool.load(held).recipients[0].next_attempt > time.time() + 3000
    assert listing[held]["state"] == "hold"
    q.daemon.start()
    assert wait_for(lambda: not q.spool.exists(waiting), 10)
    assert q.delivered() == ["out-%s.eml" % waiting]
    assert q.spool.exists(held) and q.listing()[held]["state"] == "hold"


def test_flush_with_running_daemon_delivers_a_deferred_message(q):
    q.daemon.start()
    qid = q.inject(next_attempt=later())
    time.sleep(2.5)  # one scan: the daemon has seen it and left it deferred
    assert q.spool.exists(qid) and q.delivered() == []
    assert q.run("flush", qid).returncode == 0
    assert wait_for(lambda: not q.spool.exists(qid), 10)
    assert q.delivered() == ["out-%s.eml" % qid]


def test_held_message_is_not_delivered_while_held_by_a_running_daemon(q):
    q.daemon.start()
    qid = q.inject(next_attempt=later())
    assert q.run("hold", qid).returncode == 0
    assert q.run("flush").returncode == 0
    time.sleep(2.5)
    assert q.spool.exists(qid) and q.delivered() == []
    assert q.run("release", qid).returncode == 0
    assert wait_for(lambda: not q.spool.exists(qid), 10)
    assert q.delivered() == ["out-%s.eml" % qid]


def test_bounce_without_daemon_writes_the_report_into_the_spool(q):
    qid = q.inject(attempts=2, last_reply="451 4.3.0 later", next_attempt=later())
    out = q.run("bounce", qid)
    assert out.returncode == 0, out.stderr
    assert not q.spool.exists(qid)
    ids = q.spool.ids()
    assert len(ids) == 1
    report = q.spool.load(ids[0])
    assert report.sender == "" and report.is_bounce
    assert [r.address for r in report.recipients] == ["a@sender.test"]
    q.daemon.start()
    assert wait_for(lambda: any(n.startswith("bounce-") for n in os.listdir(q.tmp)), 10)


def test_corrupt_envelope_is_moved_to_corrupt_and_reported(q):
    good = q.inject()
    bad = "00000000000000BAD1"
    with open(os.path.join(q.daemon.spool_dir, "queue", bad + ".msg"), "wb") as f:
        f.write(BODY)
    with open(os.path.join(q.daemon.spool_dir, "queue", bad + ".env"), "w") as f:
        f.write('{"version": 1, "queue_id": "garbage"')
    out = q.run("list", "--json")
    assert out.returncode == 0
    assert [m["id"] for m in json.loads(out.stdout)] == [good]
    assert bad in out.stderr and "corrupt" in out.stderr and "Traceback" not in out.stderr
    assert bad in q.spool.corrupt_ids()


BIG_HEADERS = (b"From: <a@sender.test>\r\nSubject: big\r\nMessage-ID: <big@sender.test>\r\n"
               + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 70) for i in range(300)) + b"\r\nhello\r\n")


def test_bounce_that_cannot_store_its_report_keeps_the_message(q):
    qid = q.inject(attempts=2, last_reply="451 4.3.0 later", next_attempt=later(), body=BIG_HEADERS)
    # Files up to 16 KiB: the envelope fits, the report (it quotes the 24 KiB header block) does not.
    out = q.run_limited(16 * 1024, "bounce", qid)
    assert out.returncode == 1, out
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("pmaster: ")
    assert "Traceback" not in out.stderr
    assert q.spool.ids() == [qid]
    r = q.spool.load(qid).recipients[0]
    assert (r.state, r.attempts, r.last_reply) == ("pending", 2, "451 4.3.0 later")
    out = q.run("bounce", qid)  # with room again, the bounce goes through
    assert out.returncode == 0, out.stderr
    ids = q.spool.ids()
    assert len(ids) == 1 and ids[0] != qid and q.spool.load(ids[0]).is_bounce


@pytest.fixture
def shared_dir():
    """A directory that another user can reach (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="pmaster-owner-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_cli_run_by_root_writes_as_the_owner_of_the_spool(q, shared_dir):
    assert os.geteuid() == 0, "this test needs root, as on the CI machine"
    nobody = pwd.getpwnam("nobody")
    spool_dir = os.path.join(shared_dir, "spool")
    with open(q.daemon.config_path) as f:
        text = f.read().replace(q.daemon.spool_dir, spool_dir)
    with open(q.daemon.config_path, "w") as f:
        f.write(text)
    q.spool = Spool(spool_dir)
    qid = q.inject(next_attempt=later())
    for root, dirs, files in os.walk(spool_dir):  # what the daemon does before it drops to user-id
        for name in [root] + [os.path.join(root, n) for n in dirs + files]:
            os.chown(name, nobody.pw_uid, nobody.pw_gid)
    for action in (("hold", qid), ("release", qid), ("flush", qid), ("flush",), ("show", qid)):
        out = q.run(*action)
        assert out.returncode == 0, (action, out.stderr)
    assert q.listing()[qid]["state"] == "active"
    other = q.inject(next_attempt=later())
    if os.path.exists(q.spool.env_path(other)):
        os.chown(q.spool.env_path(other), nobody.pw_uid, nobody.pw_gid)
    os.chown(q.spool.body_path(other), nobody.pw_uid, nobody.pw_gid)
    out = q.run("bounce", other)  # writes a new message: the report
    assert out.returncode == 0, out.stderr
    owners = {}
    for root, dirs, files in os.walk(spool_dir):
        for name in [root] + [os.path.join(root, n) for n in dirs + files]:
            st = os.stat(name)
            owners[os.path.relpath(name, spool_dir)] = (st.st_uid, st.st_gid)
    assert {"queue/%s.env" % qid, "queue/%s.msg" % qid, "trigger"} <= set(owners)
    assert len([n for n in owners if n.startswith("queue/") and n.endswith(".msg")]) == 2  # qid and the report
    assert {k: v for k, v in owners.items() if v != (nobody.pw_uid, nobody.pw_gid)} == {}
