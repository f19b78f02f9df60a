"""Scheduler tests: the pure functions from tables, and an in-process Scheduler with a fake clock driving the
real pipe and relay mailers (real subprocesses, real SMTP sinks on loopback)."""

import contextlib
import email
import logging
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from pmaster import scheduler as sched_mod
from pmaster.config import load
from pmaster.envelope import BOUNCED, PENDING, SENT, Envelope, Recipient
from pmaster.errors import SpoolError
from pmaster.mailers import relay
from pmaster.mailers.dispatch import Mailers
from pmaster.routing import bounce_recipients
from pmaster.scheduler import Job, Scheduler, backoff, destination_limit, destination_of, plan_jobs
from pmaster.spool import Spool
from pmaster.tests.daemon_fixture import REPO, wait_for
from pmaster.tests.smtpsink import SmtpSink

BODY = b"From: a@src.test\r\nSubject: sched\r\nMessage-ID: <m1@src.test>\r\n\r\nhello\r\n"

BASE = """\
[core]
  hostname = mx.test
  spool-directory = spool
  workers = {workers}
  destination-concurrency = {dc}
  retry-min = 10s
  retry-max = 80s
  queue-lifetime = 100s
  dns-server = 127.0.0.1:9

[pipe rec]
  exec = /bin/sh {tmp}/rec.sh ${{QUEUE_ID}} ${{RCPT_TO}}
  max_rcpt_to = {max_rcpt}

[pipe single]
  exec = /bin/sh {tmp}/rec.sh ${{QUEUE_ID}} ${{RCPT_TO}}

[pipe temp]
  exec = /bin/sh -c "exit {temp_exit}"

[pipe perm]
  exec = /bin/sh -c "echo no such user >&2; exit 67"

[route]
  @src.test pipe(cat > {tmp}/bounce-$QUEUE_ID.eml)
  postmaster {postmaster}
{extra}
"""


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Setup:
    """A loaded configuration, a spool and a scheduler on a fake clock, with real mailers."""

    def __init__(self, tmp_path, workers=4, dc=10, max_rcpt=16, extra="", postmaster=None, temp_exit=75):
        self.tmp = str(tmp_path)
        with open(os.path.join(self.tmp, "rec.sh"), "w") as f:
            # One line per invocation: the queue id and every recipient argument.
            f.write('echo "$*" >> "%s/argv.log"\ncat > /dev/null\n' % self.tmp)
        self.path = os.path.join(self.tmp, "pm.cf")
        pm = postmaster or "pipe(cat > %s/postmaster-$QUEUE_ID.eml)" % self.tmp
        self.write(workers=workers, dc=dc, max_rcpt=max_rcpt, extra=extra, postmaster=pm,
                   temp_exit=temp_exit)
        self.config = load(self.path)
        self.spool = Spool(os.path.join(self.tmp, "spool"))
        self.clock = Clock()
        self.sched = Scheduler(lambda: self.config, self.spool, Mailers(set), bounce_recipients, now=self.clock)

    def write(self, **values) -> None:
        with open(self.path, "w") as f:
            f.write(BASE.format(tmp=self.tmp, **values))

    def reload(self, **values) -> None:
        self.write(**values)
        self.config = load(self.path)
        self.sched.notify(None)

    def inject(self, rcpts, sender="alice@src.test", body=BODY, held=False) -> str:
        recipients = [Recipient(address=a, original=a, mailer=m, target=t) for a, m, t in rcpts]
        with self.spool.writer() as w:
            w.write(body)
            w.commit(Envelope(queue_id=w.queue_id, sender=sender, recipients=recipients, arrival=self.clock(),
                              size=len(body), held=held))
        self.sched.notify(w.queue_id)
        return w.queue_id

    def env(self, qid):
        try:
            return self.spool.load(qid)
        except SpoolError:
            return None

    def argv_lines(self):
        try:
            with open(os.path.join(self.tmp, "argv.log")) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def files(self, prefix):
        return sorted(n for n in os.listdir(self.tmp) if n.startswith(prefix))

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.sched.notify(None)

    def wait_state(self, qid, index, predicate, timeout=10.0):
        def check():
            env = self.env(qid)
            return env is not None and predicate(env.recipients[index])
        assert wait_for(check, timeout), self.env(qid)


@pytest.fixture
def setup(tmp_path):
    made = []

    def make(**kwargs) -> Setup:
        s = Setup(tmp_path, **kwargs)
        made.append(s)
        s.sched.start()
        return s

    yield make
    for s in made:
        s.sched.stop(time.monotonic() + 5)


@pytest.fixture(autouse=True)
def fresh_refused_memo(monkeypatch):
    monkeypatch.setattr(relay, "REFUSED", relay.RefusedHosts())


def rcpt(address, mailer="pipe", target="rec", state=PENDING, next_attempt=0.0):
    return Recipient(address=address, original=address, mailer=mailer, target=target, state=state,
                     next_attempt=next_attempt)


def envelope(recipients, held=False):
    return Envelope(queue_id="0000000000000ABCDE", sender="a@src.test", recipients=recipients, arrival=0.0,
                    held=held)


# -- pure functions --------------------------------------------------------------------------------


@pytest.mark.parametrize("attempts, expected", [
    (0, 0), (1, 60), (2, 120), (3, 240), (4, 480), (5, 960), (6, 1920), (7, 3600), (8, 3600), (100, 3600),
])
def test_backoff_doubles_from_retry_min_up_to_retry_max(attempts, expected):
    assert backoff(attempts, 60, 3600) == expected


def test_backoff_stays_between_retry_min_and_retry_max_for_every_attempt():
    for attempts in range(1, 200):
        assert 300 <= backoff(attempts, 300, 4 * 3600) <= 4 * 3600


@pytest.fixture
def config(tmp_path):
    s = Setup(tmp_path, max_rcpt=16, extra="[relay up]\n  address = 127.0.0.1:9\n")
    return s.config


def test_plan_jobs_puts_three_recipients_in_one_pipe_batch_with_max_rcpt_to_16(config):
    env = envelope([rcpt("a@x.test"), rcpt("b@x.test"), rcpt("c@x.test")])
    jobs = plan_jobs(env, config, now=1.0, busy=set())
    assert [j.indexes for j in jobs] == [(0, 1, 2)]


def test_plan_jobs_gives_each_recipient_its_own_job_with_max_rcpt_to_1(config):
    env = envelope([rcpt("a@x.test", target="single"), rcpt("b@x.test", target="single"),
                    rcpt("c@x.test", target="single")])
    assert [j.indexes for j in plan_jobs(env, config, 1.0, set())] == [(0,), (1,), (2,)]


def test_plan_jobs_splits_relay_batches_at_100_recipients(config):
    env = envelope([rcpt("u%d@x.test" % i, "relay", "up") for i in range(250)])
    assert [len(j.indexes) for j in plan_jobs(env, config, 1.0, set())] == [100, 100, 50]


def test_plan_jobs_groups_mx_relay_by_recipient_domain(config):
    env = envelope([rcpt("a@one.test", "relay", "relay()"), rcpt("b@two.test", "relay", "relay()"),
                    rcpt("c@one.test", "relay", "relay()")])
    jobs = plan_jobs(env, config, 1.0, set())
    assert sorted((j.destination, j.indexes) for j in jobs) == [("relay():one.test", (0, 2)),
                                                              ("relay():two.test", (1,))]


def test_plan_jobs_separates_targets_and_skips_sent_busy_and_future_recipients(config):
    env = envelope([rcpt("a@x.test"), rcpt("b@x.test", target="single"), rcpt("c@x.test", state=SENT),
                    rcpt("d@x.test", next_attempt=50.0), rcpt("e@x.test")])
    jobs = plan_jobs(env, config, now=10.0, busy={(env.queue_id, 4)})
    assert sorted((j.target, j.indexes) for j in jobs) == [("rec", (0,)), ("single", (1,))]


def test_plan_jobs_plans_nothing_for_a_held_message(config):
    assert plan_jobs(envelope([rcpt("a@x.test")], held=True), config, 1.0, set()) == []


def test_destination_of_names_mailer_and_target():
    assert destination_of(rcpt("a@x.test")) == "pipe:rec"
    assert destination_of(rcpt("a@X.test", "relay", "relay()")) == "relay():x.test"
    assert destination_of(rcpt("a@x.test", "relay", "up")) == "relay:up"


def test_destination_limit_always_leaves_one_worker_for_other_destinations(tmp_path):
    assert destination_limit(Setup(tmp_path, workers=8, dc=10).config) == 7
    assert destination_limit(Setup(tmp_path, workers=8, dc=3).config) == 3
    assert destination_limit(Setup(tmp_path, workers=1, dc=10).config) == 1


# -- an in-process scheduler with real mailers --------------------------------------------------------


def test_pipe_batch_of_three_recipients_runs_the_program_once(setup):
    s = setup(max_rcpt=16)
    qid = s.inject([("a@x.test", "pipe", "rec"), ("b@x.test", "pipe", "rec"), ("c@x.test", "pipe", "rec")])
    assert wait_for(lambda: not s.spool.exists(qid), 10)
    assert s.argv_lines() == ["%s a@x.test b@x.test c@x.test" % qid]


def test_pipe_with_max_rcpt_to_2_runs_twice_for_three_recipients(setup):
    s = setup(max_rcpt=2)
    qid = s.inject([("a@x.test", "pipe", "rec"), ("b@x.test", "pipe", "rec"), ("c@x.test", "pipe", "rec")])
    assert wait_for(lambda: not s.spool.exists(qid), 10)
    assert sorted(s.argv_lines()) == ["%s a@x.test b@x.test" % qid, "%s c@x.test" % qid]


def test_relay_section_batch_goes_in_one_transaction(setup):
    with SmtpSink() as sink:
        s = setup(extra="[relay up]\n  address = 127.0.0.1:%d\n" % sink.port)
        s.inject([("u%d@x.test" % i, "relay", "up") for i in range(5)])
        msgs = sink.wait_for_messages(1, 10)
        time.sleep(0.2)
        assert len(sink.transactions) == 1
        assert msgs[0].rcpts == ["u%d@x.test" % i for i in range(5)]


class CountingSink(SmtpSink):
    """Counts SMTP sessions open at the same time."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.peak = 0

    def _register(self, sock, add):
        super()._register(sock, add)
        with self._cond:
            self.peak = max(self.peak, len(self._open))


def test_at_most_destination_concurrency_sessions_per_destination(setup):
    with CountingSink(greeting_delay=0.4) as sink:
        s = setup(workers=6, dc=2, extra="[relay up]\n  address = 127.0.0.1:%d\n" % sink.port)
        for i in range(6):
            s.inject([("u%d@x.test" % i, "relay", "up")])
        assert len(sink.wait_for_messages(6, 15)) == 6
        assert sink.peak == 2


def test_dead_destination_does_not_hold_every_worker(setup):
    with CountingSink(greeting_delay=30) as dead:
        s = setup(workers=3, dc=10, extra="[relay dead]\n  address = 127.0.0.1:%d\n" % dead.port)
        for i in range(5):
            s.inject([("u%d@x.test" % i, "relay", "dead")])
        assert wait_for(lambda: dead.peak >= 2, 5)
        qid = s.inject([("ok@x.test", "pipe", "rec")])
        assert wait_for(lambda: not s.spool.exists(qid), 5), "mail to a second destination did not go out"
        assert dead.peak == 2


def test_temporary_failure_retries_at_backoff_times_of_the_fake_clock(setup):
    s = setup()
    qid = s.inject([("a@x.test", "pipe", "temp")])
    start = s.clock()
    s.wait_state(qid, 0, lambda r: r.attempts == 1)
    r = s.env(qid).recipients[0]
    assert (r.state, r.next_attempt - start) == (PENDING, 10)
    time.sleep(0.3)
    assert s.env(qid).recipients[0].attempts == 1  # not due yet: no attempt
    s.advance(10)
    s.wait_state(qid, 0, lambda r: r.attempts == 2)
    assert s.env(qid).recipients[0].next_attempt - s.clock() == 20


def test_expiry_bounces_at_queue_lifetime_with_status_4_4_7(setup):
    s = setup()
    qid = s.inject([("a@x.test", "pipe", "temp")])
    s.wait_state(qid, 0, lambda r: r.attempts == 1)
    for attempt in range(2, 12):
        if not s.spool.exists(qid):
            break
        s.advance(s.env(qid).recipients[0].next_attempt - s.clock())
        assert wait_for(lambda n=attempt: _attempts(s, qid) in (n, None), 10)
    assert not s.spool.exists(qid)
    assert wait_for(lambda: s.files("bounce-"), 10)
    report = _read(s, s.files("bounce-")[0])
    assert "Status: 4.4.7" in report and "gave up" in report


def test_last_retry_never_falls_after_the_expiry_time(setup):
    s = setup()
    qid = s.inject([("a@x.test", "pipe", "temp")])
    s.wait_state(qid, 0, lambda r: r.attempts == 1)
    arrival = s.env(qid).arrival
    s.advance(95)
    s.wait_state(qid, 0, lambda r: r.attempts == 2)
    assert s.env(qid).recipients[0].next_attempt == arrival + 100


def test_permanent_failure_bounces_once_to_the_sender(setup):
    s = setup()
    qid = s.inject([("a@x.test", "pipe", "perm"), ("b@x.test", "pipe", "rec")])
    assert wait_for(lambda: not s.spool.exists(qid) and s.files("bounce-"), 10)
    time.sleep(0.3)
    assert len(s.files("bounce-")) == 1
    msg = email.message_from_string(_read(s, s.files("bounce-")[0]))
    assert msg.get_content_type() == "multipart/report"
    status = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"][0]
    text = status.as_string()
    assert "a@x.test" in text and "b@x.test" not in text and "no such user" in text


def test_null_sender_failure_never_bounces(setup, caplog):
    caplog.set_level(logging.INFO, "pmaster")
    s = setup()
    qid = s.inject([("a@x.test", "pipe", "perm")], sender="")
    assert wait_for(lambda: not s.spool.exists(qid), 10)
    time.sleep(0.3)
    assert s.spool.ids() == []
    assert "null sender: no bounce sent" in caplog.text


def test_failed_bounce_goes_once_to_postmaster_and_never_further(setup, caplog):
    caplog.set_level(logging.INFO, "pmaster")
    s = setup(extra="  @bad.test perm\n")
    qid = s.inject([("a@x.test", "pipe", "perm")], sender="someone@bad.test")
    assert wait_for(lambda: s.files("postmaster-"), 10)
    assert wait_for(lambda: s.spool.ids() == [], 10)
    assert not s.spool.exists(qid)
    report = _read(s, s.files("postmaster-")[0])
    assert "Undelivered Mail Returned to Sender" in report
    assert len(s.files("postmaster-")) == 1 and s.files("bounce-") == []


def test_failed_report_to_postmaster_is_dropped(setup, caplog):
    caplog.set_level(logging.INFO, "pmaster")
    s = setup(extra="  @bad.test perm\n", postmaster="perm")
    s.inject([("a@x.test", "pipe", "perm")], sender="someone@bad.test")
    assert wait_for(lambda: "undeliverable report to postmaster dropped" in caplog.text, 10)
    assert wait_for(lambda: s.spool.ids() == [], 10)


def test_sent_recipient_is_not_delivered_again_by_a_new_scheduler(setup, tmp_path):
    s = setup()
    qid = s.inject([("a@x.test", "pipe", "rec"), ("b@x.test", "pipe", "temp")])
    s.wait_state(qid, 1, lambda r: r.attempts == 1)
    s.wait_state(qid, 0, lambda r: r.state == SENT)  # two targets, two jobs: either may be recorded first
    env = s.env(qid)
    assert [r.state for r in env.recipients] == [SENT, PENDING]
    s.sched.stop(time.monotonic() + 5)
    # A new scheduler on the same spool (a restart) where the failing target now works.
    s2 = Setup(tmp_path, temp_exit=0)
    try:
        s2.sched.start()
        s2.advance(10)
        assert wait_for(lambda: not s2.spool.exists(qid), 10)
    finally:
        s2.sched.stop(time.monotonic() + 5)
    lines = [line for line in s2.argv_lines() if "a@x.test" in line]
    assert lines == ["%s a@x.test" % qid]


def test_fixed_relay_section_applies_to_queued_mail_after_reload(setup):
    with SmtpSink() as sink:
        s = setup(extra="[relay up]\n  address = 127.0.0.1:9\n")
        qid = s.inject([("a@x.test", "relay", "up")])
        s.wait_state(qid, 0, lambda r: r.attempts == 1)
        s.reload(workers=4, dc=10, max_rcpt=16, postmaster="perm", temp_exit=75, extra="[relay up]\n  address = 127.0.0.1:%d\n" % sink.port)
        s.advance(10)
        assert len(sink.wait_for_messages(1, 10)) == 1
        assert wait_for(lambda: not s.spool.exists(qid), 5)


def test_section_that_has_gone_defers_and_logs(setup, caplog):
    caplog.set_level(logging.INFO, "pmaster")
    s = setup()
    qid = s.inject([("a@x.test", "relay", "vanished")])
    s.wait_state(qid, 0, lambda r: r.attempts == 1)
    r = s.env(qid).recipients[0]
    assert r.state == PENDING and "[relay vanished] is not configured" in r.last_reply
    assert "%s: mailer section [relay vanished] is not configured" % qid in caplog.text


def test_delivery_log_line_has_the_documented_shape(setup, caplog):
    caplog.set_level(logging.INFO, "pmaster")
    s = setup()
    qid = s.inject([("a@x.test", "pipe", "rec"), ("b@x.test", "pipe", "temp"), ("c@x.test", "pipe", "perm")])
    assert wait_for(lambda: caplog.text.count("%s: to=<" % qid) >= 3, 10)
    shape = re.compile(r"^(\w+): to=<([^>]*)> mailer=(\S+) status=(sent|deferred|bounced) delay=[\d.]+ \((.*)\)$")
    found = {}
    for record in caplog.records:
        m = shape.match(record.getMessage())
        if m and m.group(1) == qid:
            found[m.group(2)] = (m.group(3), m.group(4))
    assert found == {"a@x.test": ("rec", "sent"), "b@x.test": ("temp", "deferred"),
                     "c@x.test": ("perm", "bounced")}


def test_corrupt_envelope_moves_to_corrupt_and_the_scheduler_keeps_running(setup, caplog):
    caplog.set_level(logging.INFO, "pmaster")
    s = setup()
    bad = "00000000000000BAD1"
    with open(os.path.join(s.tmp, "spool", "queue", bad + ".msg"), "wb") as f:
        f.write(BODY)
    with open(os.path.join(s.tmp, "spool", "queue", bad + ".env"), "w") as f:
        f.write("{ not json")
    s.sched.notify(None)
    assert wait_for(lambda: bad in s.spool.corrupt_ids(), 10)
    assert bad in caplog.text
    qid = s.inject([("a@x.test", "pipe", "rec")])
    assert wait_for(lambda: not s.spool.exists(qid), 10)


def test_held_message_is_not_delivered_until_released(setup):
    s = setup()
    qid = s.inject([("a@x.test", "pipe", "rec")], held=True)
    time.sleep(0.5)
    assert s.argv_lines() == [] and s.spool.exists(qid)
    with s.spool.lock(qid):
        env = s.spool.load(qid)
        env.held = False
        s.spool.save(env)
    s.sched.notify(qid)
    assert wait_for(lambda: not s.spool.exists(qid), 10)


def test_concurrent_notifications_never_deliver_a_recipient_twice(setup):
    s = setup(workers=4)
    qids = [s.inject([("r%d@x.test" % i, "pipe", "single")]) for i in range(10)]
    stop = threading.Event()

    def poke():
        for _ in range(200):
            if stop.is_set():
                return
            s.sched.notify(None)
            for q in qids:
                s.sched.notify(q)
            time.sleep(0.005)

    t = threading.Thread(target=poke)
    t.start()
    try:
        assert wait_for(lambda: not any(s.spool.exists(q) for q in qids), 15)
    finally:
        stop.set()
        t.join(5)
    assert sorted(s.argv_lines()) == sorted("%s r%d@x.test" % (q, i) for i, q in enumerate(qids))


def test_job_value_is_hashable_and_carries_its_destination():
    job = Job("Q", "pipe", "rec", "pipe:rec", (0, 1))
    assert {job: 1}[job] == 1 and job.destination == "pipe:rec"


def test_module_exports_send_bounce_for_the_cli():
    assert callable(sched_mod.send_bounce) and BOUNCED == "bounced"


def _attempts(s: Setup, qid: str):
    """The first recipient's attempts, or None once the message is gone."""
    env = s.env(qid) if s.spool.exists(qid) else None
    return env.recipients[0].attempts if env is not None else None


def _read(s: Setup, name: str) -> str:
    with open(os.path.join(s.tmp, name), encoding="utf-8", errors="replace") as f:
        return f.read()


# -- planning work is proportional to what changed, not to the queue ----------------------------------------


class CountingSpool(Spool):
    """A real spool that remembers which envelopes were loaded."""

    def __init__(self, directory):
        super().__init__(directory)
        self.loads = []

    def load(self, qid):
        self.loads.append(qid)
        return super().load(qid)


def _counting_setup(tmp_path) -> Setup:
    s = Setup(tmp_path)
    s.spool = CountingSpool(os.path.join(s.tmp, "spool"))
    s.sched = Scheduler(lambda: s.config, s.spool, Mailers(set), bounce_recipients, now=s.clock)
    return s


def _commit_deferred(s: Setup, due: float) -> str:
    """A message committed behind the scheduler's back (no notify), due at ``due``."""
    r = Recipient(address="a@x.test", original="a@x.test", mailer="pipe", target="rec", next_attempt=due)
    with s.spool.writer() as w:
        w.write(BODY)
        w.commit(Envelope(queue_id=w.queue_id, sender="alice@src.test", recipients=[r], arrival=s.clock(),
                          size=len(BODY)))
    return w.queue_id


def test_new_message_and_rescan_do_not_read_deferred_messages_again(tmp_path):
    s = _counting_setup(tmp_path)
    deferred = [_commit_deferred(s, s.clock() + 3600) for _ in range(20)]
    s.sched.start()
    try:
        assert wait_for(lambda: set(deferred) <= set(s.spool.loads), 5)
        time.sleep(0.2)
        del s.spool.loads[:]
        qid = s.inject([("a@x.test", "pipe", "rec")])
        assert wait_for(lambda: not s.spool.exists(qid), 10)
        s.sched.notify(None)  # a full rescan: unchanged records are only looked at, not read
        time.sleep(0.3)
        assert not set(deferred) & set(s.spool.loads)
        assert s.spool.loads.count(qid) <= 2  # planning and recording; the job gets planning's copy
    finally:
        s.sched.stop(time.monotonic() + 5)


def _commit_fresh(s: Setup):
    """A message committed as the SMTP session does it: (its writer, with the stamp, and its envelope)."""
    r = Recipient(address="a@x.test", original="a@x.test", mailer="pipe", target="rec")
    with s.spool.writer() as w:
        w.write(BODY)
        env = Envelope(queue_id=w.queue_id, sender="alice@src.test", recipients=[r], arrival=s.clock(),
                       size=len(BODY))
        w.commit(env)
    return w, env


def test_message_notified_with_its_envelope_is_delivered_without_reading_it_back(tmp_path):
    s = _counting_setup(tmp_path)
    s.sched.start()
    try:
        w, env = _commit_fresh(s)
        assert w.stamp == s.spool.stamp(w.queue_id)
        s.sched.notify(w.queue_id, (w.stamp, env))  # what the SMTP session does after its commit
        assert wait_for(lambda: not s.spool.exists(w.queue_id), 10)
        assert s.argv_lines() == ["%s a@x.test" % w.queue_id]
        assert w.queue_id not in s.spool.loads
    finally:
        s.sched.stop(time.monotonic() + 5)


def test_stale_envelope_handed_over_is_read_again_before_delivery(tmp_path):
    s = _counting_setup(tmp_path)
    w, env = _commit_fresh(s)
    with s.spool.lock(w.queue_id):  # held before the scheduler plans from the copy it was handed
        held = s.spool.load(w.queue_id)
        held.held = True
        s.spool.save(held)
    s.sched.notify(w.queue_id, (w.stamp, env))
    s.sched.start()
    try:
        time.sleep(0.5)
        assert s.argv_lines() == []
        assert s.spool.load(w.queue_id).recipients[0].attempts == 0
    finally:
        s.sched.stop(time.monotonic() + 5)


def test_touched_trigger_makes_the_scheduler_notice_an_outside_change(tmp_path):
    s = _counting_setup(tmp_path)
    qid = _commit_deferred(s, s.clock() + 3600)
    s.sched.start()
    try:
        assert wait_for(lambda: qid in s.spool.loads, 5)
        time.sleep(0.2)
        with s.spool.lock(qid):  # what ``pmaster queue flush`` does, without telling the scheduler
            env = s.spool.load(qid)
            env.recipients[0].next_attempt = 0.0
            s.spool.save(env)
        sched_mod.touch_trigger(s.spool)
        assert wait_for(lambda: not s.spool.exists(qid), sched_mod.TRIGGER_CHECK + 4)
    finally:
        s.sched.stop(time.monotonic() + 5)


def test_touch_trigger_always_moves_the_trigger_time_forward(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    stamps = []
    for _ in range(5):
        sched_mod.touch_trigger(spool)
        stamps.append(os.stat(sched_mod.trigger_path(spool)).st_mtime_ns)
    assert stamps == sorted(set(stamps))


def test_job_carries_planning_envelope_outside_its_identity():
    env = envelope([rcpt("a@x.test")])
    job = Job("Q", "pipe", "rec", "pipe:rec", (0,), envelope=env, stamp=(1, 2, 3))
    assert job == Job("Q", "pipe", "rec", "pipe:rec", (0,)) and job.envelope is env


# -- results that cannot be recorded, shutdown, bounces that cannot be queued -------------------------------


class FailingSaves:
    """Makes ``spool.save`` of one in-process spool raise ``SpoolError`` while ``failing`` is set.

    The one stand-in in these tests: they run as root, where file modes do not stop a write, and a full
    file system cannot be arranged for one thread of this process; everything else stays real.
    """

    def __init__(self, spool: Spool, monkeypatch) -> None:
        self.failing = True
        real = spool.save

        def save(env):
            if self.failing:
                raise SpoolError("%s: cannot save envelope: [Errno 28] No space left on device" % env.queue_id)
            return real(env)

        monkeypatch.setattr(spool, "save", save)


def test_failed_save_after_delivery_never_delivers_the_recipient_again(setup, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "pmaster")
    s = setup()
    saves = FailingSaves(s.spool, monkeypatch)
    qid = s.inject([("a@x.test", "pipe", "rec"), ("b@x.test", "pipe", "temp")])
    assert wait_for(lambda: caplog.text.count("cannot record delivery results") >= 2, 10)
    time.sleep(1.0)  # the record on disk still says "pending, due now": nothing may be delivered again
    assert s.argv_lines() == ["%s a@x.test" % qid]
    assert [r.attempts for r in s.env(qid).recipients] == [0, 0]
    failures = caplog.text.count("cannot record delivery results")
    time.sleep(0.3)
    assert caplog.text.count("cannot record delivery results") == failures  # no retry before its time
    s.advance(60)
    assert wait_for(lambda: caplog.text.count("cannot record delivery results") == failures + 1, 5)
    time.sleep(0.3)
    assert caplog.text.count("cannot record delivery results") == failures + 1  # one line per retry
    saves.failing = False
    s.advance(25)  # the next try, 20 s after the failed one (and before queue-lifetime bounces b)
    s.wait_state(qid, 0, lambda r: r.state == SENT)
    env = s.env(qid)
    assert env.recipients[0].attempts == 1
    assert env.recipients[1].state == PENDING and env.recipients[1].attempts >= 1
    assert s.argv_lines() == ["%s a@x.test" % qid]


def test_results_kept_after_a_failed_save_are_saved_at_shutdown(setup, monkeypatch):
    s = setup()
    saves = FailingSaves(s.spool, monkeypatch)
    qid = s.inject([("a@x.test", "pipe", "rec"), ("b@x.test", "pipe", "temp")])
    assert wait_for(lambda: len(s.argv_lines()) == 1 and s.sched.in_flight == 0, 10)
    time.sleep(0.3)
    saves.failing = False
    s.sched.stop(time.monotonic() + 5)
    env = s.env(qid)
    assert [(r.state, r.attempts) for r in env.recipients] == [(SENT, 1), (PENDING, 1)]


def test_message_locked_by_another_process_does_not_hold_a_worker(setup, monkeypatch):
    monkeypatch.setattr(sched_mod, "RECORD_LOCK_WAIT", 0.3)
    s = setup(workers=1)
    qid = _commit_deferred(s, 0.0)  # due now; the scheduler hears of it below
    with s.spool.lock(qid):  # what a suspended ``pmaster queue`` holding the message lock looks like
        s.sched.notify(qid)
        assert wait_for(lambda: s.argv_lines() == ["%s a@x.test" % qid], 10)
        other = s.inject([("b@x.test", "pipe", "single")])
        assert wait_for(lambda: not s.spool.exists(other), 5), "the only worker still waits for the lock"
        assert s.env(qid).recipients[0].attempts == 0
    s.advance(60)
    assert wait_for(lambda: not s.spool.exists(qid), 10)
    assert [line for line in s.argv_lines() if "a@x.test" in line] == ["%s a@x.test" % qid]


def test_stop_lets_the_running_delivery_finish_and_starts_no_queued_job(setup):
    s = setup(workers=1, extra='[pipe slow]\n  exec = /bin/sh -c "cat > /dev/null; sleep 1"\n')
    running = s.inject([("a@x.test", "pipe", "slow")])
    assert wait_for(lambda: s.sched.in_flight == 1, 5)
    queued = s.inject([("b@x.test", "pipe", "rec")])
    assert wait_for(lambda: s.sched.queued_jobs == 1, 5)  # planned, waiting for the only worker
    s.sched.stop(time.monotonic() + 5)
    assert not s.spool.exists(running)  # the delivery in progress finished and was recorded
    assert s.argv_lines() == []
    assert s.env(queued).recipients[0].attempts == 0



def test_stop_starts_no_job_waiting_in_a_ready_line(setup):
    s = setup(workers=2, dc=1, extra='[pipe slow]\n  exec = /bin/sh -c "cat > /dev/null; sleep 1"\n')
    running = s.inject([("a@x.test", "pipe", "slow")])
    assert wait_for(lambda: s.sched.in_flight == 1, 5)
    queued = s.inject([("b@x.test", "pipe", "slow")])  # its destination is full: planned ahead, not started
    assert wait_for(lambda: s.sched.queued_jobs == 1, 5)
    s.sched.stop(time.monotonic() + 5)
    assert not s.spool.exists(running)
    assert s.env(queued).recipients[0].attempts == 0


def test_an_ended_job_starts_the_next_of_its_destination_without_a_planning_round(tmp_path, monkeypatch):
    rounds = []
    release = threading.Event()
    plan_once = Scheduler._plan_once

    def first_round_only(self):
        if rounds:
            release.wait(30)  # planning is stuck after its first round until the test ends
        rounds.append(1)
        return plan_once(self)

    monkeypatch.setattr(Scheduler, "_plan_once", first_round_only)
    s = Setup(tmp_path, workers=2, dc=1)
    qids = [s.inject([("u%d@x.test" % i, "pipe", "single")]) for i in range(4)]
    s.sched.start()  # one round plans all four: one starts, three wait in the destination's ready line
    try:
        assert wait_for(lambda: not any(s.spool.exists(q) for q in qids), 10)
        assert sorted(s.argv_lines()) == sorted("%s u%d@x.test" % (q, i) for i, q in enumerate(qids))
        assert len(rounds) <= 2  # the second round is the one still waiting
    finally:
        release.set()
        s.sched.stop(time.monotonic() + 5)



def test_a_message_that_waited_for_room_goes_before_one_that_arrived_later(tmp_path, monkeypatch):
    monkeypatch.setattr(sched_mod, "READY_PER_DESTINATION", 1)
    rounds = threading.Semaphore(1)  # planning rounds run only as the test allows
    free = threading.Event()
    plan_once = Scheduler._plan_once

    def gated(self):
        if not free.is_set():
            rounds.acquire(timeout=30)
        return plan_once(self)

    monkeypatch.setattr(Scheduler, "_plan_once", gated)
    with open(os.path.join(str(tmp_path), "slow.sh"), "w") as f:
        f.write('echo "$1" >> "%s/order.log"\ncat > /dev/null\nsleep 0.3\n' % tmp_path)
    s = Setup(tmp_path, workers=2, dc=1, extra="[pipe slow]\n  exec = /bin/sh %s/slow.sh ${RCPT_TO}\n" % tmp_path)
    for name in ("a", "b", "c"):
        s.inject([("%s@x.test" % name, "pipe", "slow")])
    s.sched.start()  # round one: a runs, b waits in the ready line, c waits for room
    order = tmp_path / "order.log"
    try:
        assert wait_for(lambda: order.exists() and order.read_text().split() == ["a@x.test"], 10)
        s.inject([("d@x.test", "pipe", "slow")])  # arrives while c waits; planned in the same round as c
        assert wait_for(lambda: order.read_text().split() == ["a@x.test", "b@x.test"], 10)  # from the line
        free.set()
        rounds.release()
        assert wait_for(lambda: len(order.read_text().split()) == 4, 10)
        assert order.read_text().split() == ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]
    finally:
        free.set()
        rounds.release()
        s.sched.stop(time.monotonic() + 5)



def _logging_pipes(tmp_path, *specs):
    """[pipe NAME] sections that log the recipient to order.log when they start, then sleep."""
    extra = ""
    for name, script in specs:
        path = os.path.join(str(tmp_path), "%s.sh" % name)
        with open(path, "w") as f:
            f.write('echo "$1" >> "%s/order.log"\ncat > /dev/null\n%s\n' % (tmp_path, script))
        extra += "[pipe %s]\n  exec = /bin/sh %s ${RCPT_TO}\n" % (name, path)
    return extra


def _order(tmp_path):
    try:
        with open(os.path.join(str(tmp_path), "order.log")) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def test_busy_destinations_do_not_keep_workers_from_another_destination(tmp_path):
    extra = _logging_pipes(tmp_path, ("a", "sleep 0.2"), ("b", "sleep 0.2"), ("c", ""))
    s = Setup(tmp_path, workers=3, dc=2, extra=extra)
    for i in range(20):
        s.inject([("a%d@x.test" % i, "pipe", "a")])
        s.inject([("b%d@x.test" % i, "pipe", "b")])
    s.sched.start()  # both destinations have a backlog in their ready lines
    try:
        assert wait_for(lambda: len(_order(tmp_path)) >= 4, 10)
        s.inject([("c@x.test", "pipe", "c")])
        assert wait_for(lambda: "c@x.test" in _order(tmp_path), 15)
        # First come, first served: the job waited for the next free worker, not for both backlogs.
        assert _order(tmp_path).index("c@x.test") < 20, _order(tmp_path)
    finally:
        s.sched.stop(time.monotonic() + 5)


@contextlib.contextmanager
def _one_line_scheduler(tmp_path, monkeypatch, extra):
    """A started scheduler with 3 workers, destination-concurrency 1 and ready lines of one job."""
    monkeypatch.setattr(sched_mod, "READY_PER_DESTINATION", 1)
    s = Setup(tmp_path, workers=3, dc=1, extra=extra)
    s.sched.start()
    try:
        yield s
    finally:
        s.sched.stop(time.monotonic() + 5)


def test_a_message_whose_destinations_are_all_full_goes_out_once_when_there_is_room(tmp_path, monkeypatch):
    with _one_line_scheduler(tmp_path, monkeypatch, _logging_pipes(tmp_path, ("a", "sleep 0.3"))) as s:
        qids = [s.inject([("a%d@x.test" % i, "pipe", "a")]) for i in range(4)]  # running, line, 2 waiting
        assert wait_for(lambda: not any(s.spool.exists(q) for q in qids), 15)
        assert _order(tmp_path) == ["a0@x.test", "a1@x.test", "a2@x.test", "a3@x.test"]


def test_a_message_waiting_at_a_full_destination_still_goes_out_at_a_free_one(tmp_path, monkeypatch):
    with _one_line_scheduler(tmp_path, monkeypatch, _logging_pipes(tmp_path, ("a", "sleep 1"), ("c", ""))) as s:
        s.inject([("a0@x.test", "pipe", "a")])
        s.inject([("a1@x.test", "pipe", "a")])
        assert wait_for(lambda: _order(tmp_path) == ["a0@x.test"], 10)
        qid = s.inject([("a2@x.test", "pipe", "a"), ("c@x.test", "pipe", "c")])
        assert wait_for(lambda: "c@x.test" in _order(tmp_path), 5)
        assert wait_for(lambda: not s.spool.exists(qid), 15)
        assert _order(tmp_path) == ["a0@x.test", "c@x.test", "a1@x.test", "a2@x.test"]


def test_a_message_not_due_yet_is_neither_waiting_nor_kept_at_a_full_destination(tmp_path, monkeypatch):
    with _one_line_scheduler(tmp_path, monkeypatch, _logging_pipes(tmp_path, ("a", "sleep 1"))) as s:
        s.inject([("a0@x.test", "pipe", "a")])
        s.inject([("a1@x.test", "pipe", "a")])  # a0 runs, a1 fills the ready line: "pipe:a" is full
        assert wait_for(lambda: _order(tmp_path) == ["a0@x.test"], 10)
        retry_at = s.clock() + 100
        with s.spool.writer() as w:  # as a restart finds a deferred message: unknown to planning
            w.write(BODY)
            w.commit(Envelope(queue_id=w.queue_id, sender="alice@src.test", arrival=s.clock(), size=len(BODY),
                              recipients=[Recipient(address="later@x.test", original="later@x.test", mailer="pipe",
                                                    target="a", attempts=1, next_attempt=retry_at)]))
        s.sched.notify(w.queue_id)
        assert wait_for(lambda: w.queue_id in s.sched._known and s.sched._known[w.queue_id].due == retry_at, 5)
        assert w.queue_id not in s.sched._waiting.get("pipe:a", {})  # nothing to send there before retry_at
        assert w.queue_id not in s.sched._cache  # so no copy is kept for it either


def test_raised_destination_concurrency_starts_the_ready_line_before_newer_mail(tmp_path):
    release = tmp_path / "release"
    # a runs until released; c runs long enough that d (the line's head) starts well before e.
    hold_a = ('case "$1" in a@*) while [ ! -e "%s" ]; do sleep 0.05; done ;; c@*) sleep 1 ;; *) sleep 0.2 ;; esac'
              % release)
    extra = _logging_pipes(tmp_path, ("slow", hold_a))
    s = Setup(tmp_path, workers=5, dc=1, extra=extra)
    for name in ("a", "b", "c", "d"):
        s.inject([("%s@x.test" % name, "pipe", "slow")])
    s.sched.start()  # a runs until released; b, c and d wait in the ready line
    try:
        assert wait_for(lambda: _order(tmp_path) == ["a@x.test"], 10)
        s.reload(workers=5, dc=3, max_rcpt=16, extra=extra, postmaster="pipe(cat > /dev/null)", temp_exit=75)
        assert wait_for(lambda: set(_order(tmp_path)[1:3]) == {"b@x.test", "c@x.test"}, 10), _order(tmp_path)
        s.inject([("e@x.test", "pipe", "slow")])
        assert wait_for(lambda: "e@x.test" in _order(tmp_path), 10)
        order = _order(tmp_path)
        assert order[-1] == "e@x.test" and set(order[:4]) == {"a@x.test", "b@x.test", "c@x.test", "d@x.test"}
    finally:
        release.touch()
        s.sched.stop(time.monotonic() + 5)


BIG_HEADERS = (b"From: a@src.test\r\nSubject: big\r\nMessage-ID: <big@src.test>\r\n"
               + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 70) for i in range(300)) + b"\r\nhello\r\n")

FSIZE_SCHEDULER = r"""
import resource, signal, sys, time
from pmaster.config import load
from pmaster.mailers.dispatch import Mailers
from pmaster.routing import bounce_recipients
from pmaster.scheduler import Scheduler
from pmaster.spool import Spool
config_path, spool_dir, qid, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too large file gives EFBIG, as on a full disk
config = load(config_path)
spool = Spool(spool_dir)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sched = Scheduler(lambda: config, spool, Mailers(set), bounce_recipients)
sched.start()
end = time.monotonic() + 10
while time.monotonic() < end and spool.exists(qid) and not spool.load(qid).recipients[0].attempts:
    time.sleep(0.05)
sched.stop(time.monotonic() + 5)
"""


def test_bounce_that_cannot_be_queued_keeps_the_recipient_deferred(tmp_path):
    s = Setup(tmp_path)
    qid = s.inject([("a@x.test", "pipe", "perm")], body=BIG_HEADERS)
    # A scheduler whose files may not exceed 16 KiB: the envelope fits, the report (with the headers) does not.
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", FSIZE_SCHEDULER, s.path, s.spool.directory, qid, str(16 * 1024)],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    assert s.spool.ids() == [qid], "the message was removed without its report"
    r = s.env(qid).recipients[0]
    assert (r.state, r.attempts) == (PENDING, 1)
    assert "no such user" in r.last_reply and "report" in r.last_reply
    assert r.next_attempt > time.time()
    # Once the report can be stored, the next attempt bounces and sends it.
    try:
        s.sched.start()
        s.advance(r.next_attempt - s.clock() + 1)
        assert wait_for(lambda: not s.spool.exists(qid) and s.files("bounce-"), 10)
    finally:
        s.sched.stop(time.monotonic() + 5)
    assert "no such user" in _read(s, s.files("bounce-")[0])
