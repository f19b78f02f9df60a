"""The web admin's parts on their own: the queue index, the statistics history, the log store, sessions."""

import time

from pmaster.envelope import Envelope, Recipient
from pmaster.spool import Spool
from pmaster.web.auth import Auth, same_origin
from pmaster.web.events import Stats, Tee
from pmaster.web.logstore import LogStore
from pmaster.web.queueindex import Filter, QueueIndex


def _queue(spool: Spool, rcpt: str, held: bool = False, subject: str = "s") -> str:
    w = spool.writer()
    env = Envelope(w.queue_id, "from@example.org", [Recipient(rcpt, rcpt, "pipe", "pipe(true)")], time.time(),
                   held=held)
    with w:
        w.write(("Subject: %s\r\n\r\nbody\r\n" % subject).encode())
        w.commit(env)
    return w.queue_id


def test_index_sees_new_changed_and_removed_messages(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    index = QueueIndex(spool)
    a = _queue(spool, "a@x.test")
    index.refresh(force=True)
    assert [e.qid for e in index.query(Filter())[1]] == [a]
    with spool.lock(a):
        env = spool.load(a)
        env.held = True
        spool.save(env)
    b = _queue(spool, "b@y.test")
    index.refresh(force=True)
    assert index.get(a).state(time.time()) == "hold"
    assert index.get(b) is not None
    with spool.lock(a):
        spool.remove(a)
    index.refresh(force=True)
    assert [e.qid for e in index.query(Filter())[1]] == [b]


def test_index_reads_unchanged_messages_once(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    index = QueueIndex(spool)
    for i in range(5):
        _queue(spool, "r%d@x.test" % i)
    index.refresh(force=True)
    index.refresh(force=True)
    assert index.loaded == 5


def test_fed_envelope_is_not_read_again(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    index = QueueIndex(spool)
    w = spool.writer()
    env = Envelope(w.queue_id, "f@x.test", [Recipient("r@x.test", "r@x.test", "pipe", "pipe(true)")], time.time())
    with w:
        w.write(b"\r\n")
        w.commit(env)
    index.feed(env.queue_id, (w.stamp, env))
    index.refresh(force=True)
    assert index.loaded == 0 and index.get(env.queue_id) is not None


def test_unindexed_page_lists_before_the_first_refresh(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    ids = [_queue(spool, "r%d@x.test" % i) for i in range(4)]
    index = QueueIndex(spool)
    total, page = index.unindexed_page(1, 2)
    assert total == 4 and [e.qid for e in page] == ids[1:3]
    assert not index.ready


def test_filters_match_domain_state_and_subject(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    index = QueueIndex(spool)
    a = _queue(spool, "a@x.test", subject="invoice 12")
    b = _queue(spool, "b@y.test", held=True)
    index.refresh(force=True)
    assert index.select(Filter(domain="Y.TEST")) == [b]
    assert index.select(Filter(state="hold")) == [b]
    assert index.select(Filter(text="invoice")) == [a]
    assert index.select(Filter(age="1h")) == []


def test_bad_filter_values_are_problems_not_errors():
    f = Filter(state="nonsense", age="tomorrow")
    assert len(f.problems) == 2 and f.empty()


def test_stats_close_intervals_into_history():
    now = [1000.0]
    stats = Stats(lambda: 3, lambda: ({"active": 1}, 5.0), interval=10, clock=lambda: now[0])
    stats.count("message", "l", "100")
    stats.count("rejection", "l", "size")
    stats.delivery("pipe", "sent", 0.1)
    stats.delivery("relay", "bounced", 0.1)
    now[0] = 1025.0
    stats.sample()
    snap = stats.snapshot()
    assert [p["received"] for p in snap["history"]] == [1, 0]
    assert snap["totals"] == {"received": 1, "delivered": 1, "deferred": 0, "bounced": 1, "rejected": 1}
    assert snap["history"][0]["queue"] == {"active": 1} and snap["history"][0]["sessions"] == 3


def test_stats_history_is_bounded_to_an_hour():
    now = [0.0]
    stats = Stats(interval=10, clock=lambda: now[0])
    now[0] = 7200.0
    stats.sample()
    assert len(stats.snapshot()["history"]) == 360


def test_tee_calls_both_hooks():
    calls = []

    class Hook:
        def count(self, *a):
            calls.append(("count",) + a)

        def delivery(self, *a):
            calls.append(("delivery",) + a)

    Tee(Hook(), Hook()).count("message", "l")
    assert len(calls) == 2


def test_log_store_keeps_lines_per_queue_id_bounded():
    store = LogStore(max_ids=2, per_id=3)
    for qid in ("AAAAAAAAAAAAAAAAA1", "AAAAAAAAAAAAAAAAA2", "AAAAAAAAAAAAAAAAA3"):
        for n in range(5):
            store.tap(0.0, "INFO", "%s: line %d" % (qid, n))
    store.tap(0.0, "INFO", "connect from [127.0.0.1]")
    assert store.lines("AAAAAAAAAAAAAAAAA1") == []
    assert [m for _, _, m in store.lines("AAAAAAAAAAAAAAAAA3")] == ["AAAAAAAAAAAAAAAAA3: line %d" % n
                                                                    for n in (2, 3, 4)]


def test_session_expires_after_idle_time(tmp_path):
    from pmaster.passwords import set_password

    path = str(tmp_path / "pw")
    set_password(path, "u", "p")
    now = [0.0]
    auth = Auth(path, clock=lambda: now[0])
    session, _ = auth.login("u", "p", "127.0.0.1")
    assert auth.session("pmaster_session=" + session.token) is session
    now[0] = 31 * 60
    assert auth.session("pmaster_session=" + session.token) is None


def test_same_origin_rules():
    ours = "http://127.0.0.1:8025"
    assert same_origin({"Origin": ours}, "http", "127.0.0.1:8025")
    assert not same_origin({"Origin": "http://evil.test"}, "http", "127.0.0.1:8025")
    assert same_origin({"Origin": "null", "Sec-Fetch-Site": "same-origin"}, "http", "127.0.0.1:8025")
    assert not same_origin({"Origin": "null"}, "http", "127.0.0.1:8025")
    assert same_origin({"Referer": ours + "/queue"}, "http", "127.0.0.1:8025")
    assert not same_origin({}, "http", "127.0.0.1:8025")


def _readonly_child(path: str, conn) -> None:
    import os

    from pmaster.web.api import Api

    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)  # root writes anything: the daemon's user-id cannot
    api = Api(lambda: None, None, None, None, None, path, lambda: None)
    current = api.config_file(path)
    outcome = api.apply(path, current["text"] + "# more\n", current["base"])
    conn.send((current["writable"], current["reason"], outcome["applied"], outcome["error"]))


def test_config_the_daemon_cannot_write_is_read_only_and_says_why():
    import multiprocessing
    import os
    import shutil
    import tempfile

    # Outside tmp_path: pytest's directories are 0700, and the child must be able to read as another user.
    directory = tempfile.mkdtemp(prefix="pmaster-readonly-")
    try:
        path = os.path.join(directory, "pmaster.cf")
        with open(path, "w") as f:
            f.write("[core]\n  hostname = mx.test\n[route]\n  @x.test pipe(true)\n")
        os.chmod(path, 0o444)
        os.chmod(directory, 0o555)
        parent, child = multiprocessing.get_context("fork").Pipe()
        proc = multiprocessing.get_context("fork").Process(target=_readonly_child, args=(path, child))
        proc.start()
        assert parent.poll(30), "the child did not answer"
        writable, reason, applied, error = parent.recv()
        proc.join(10)
        assert writable is False and "cannot write" in reason
        assert applied is False and error.startswith("read-only")
    finally:
        os.chmod(directory, 0o755)
        shutil.rmtree(directory, ignore_errors=True)
