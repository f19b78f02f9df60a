"""Tests for pmaster.spool: durable records, group commit, locks, recovery (real files in tmp_path)."""

import itertools
import os
import subprocess
import sys
import threading
import time

import pytest

from pmaster import spool as spool_module
from pmaster.envelope import Envelope, Recipient
from pmaster.errors import QueueIdError, SpoolError
from pmaster.spool import GroupSync, Spool, body_file_size, new_queue_id, open_body_file, record_trailer, valid_queue_id

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOIN_TIMEOUT = 30


def make_env(qid, sender="alice@example.org", **kw):
    rcpt = Recipient(address="bob@example.net", original="bob@example.net", mailer="relay", target="relay()")
    return Envelope(queue_id=qid, sender=sender, recipients=[rcpt], arrival=time.time(), **kw)


def store(spool, body=b"Subject: hi\r\n\r\nhello\r\n", **kw):
    with spool.writer() as w:
        w.write(body)
        env = make_env(w.queue_id, size=len(body), **kw)
        w.commit(env)
    return env


def listing(spool, sub):
    return sorted(os.listdir(os.path.join(spool.directory, sub)))


def run_python(code, *args, timeout=30):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-B", "-c", code] + [str(a) for a in args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_threads(target, count):
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads)


# -- layout -------------------------------------------------------------------------------------------

def test_spool_creates_private_subdirectories(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    for sub in ("tmp", "queue", "corrupt", "free"):
        assert os.stat(os.path.join(spool.directory, sub)).st_mode & 0o777 == 0o700


def test_spool_refuses_unknown_format_version(tmp_path):
    Spool(str(tmp_path))
    (tmp_path / "VERSION").write_text("99\n")
    with pytest.raises(SpoolError, match="format"):
        Spool(str(tmp_path))


def test_free_space_reports_available_bytes(tmp_path):
    st = os.statvfs(str(tmp_path))
    assert abs(Spool(str(tmp_path)).free_space() - st.f_bavail * st.f_frsize) < 64 * 1024 * 1024


# -- queue ids ----------------------------------------------------------------------------------------

def test_queue_ids_are_file_name_safe_and_time_prefixed():
    before = "%013X" % (time.time_ns() // 1000)
    qid = new_queue_id()
    assert valid_queue_id(qid) and qid.isalnum() and qid == qid.upper()
    assert qid[:13] >= before


def test_queue_ids_sort_by_creation():
    ids = [new_queue_id() for _ in range(500)]
    assert ids == sorted(ids)


def test_queue_ids_unique_across_threads():
    per_thread = [[] for _ in range(8)]

    def make(i):
        per_thread[i].extend(new_queue_id() for _ in range(250))

    run_threads(make, 8)
    everything = [q for ids in per_thread for q in ids]
    assert len(set(everything)) == 2000
    assert all(ids == sorted(ids) for ids in per_thread)


def test_invalid_queue_id_is_a_queue_id_error(tmp_path):
    spool = Spool(str(tmp_path))
    for bad in ("../../etc/passwd", "abc", "0123456789ABCDEF\n", ""):
        with pytest.raises(QueueIdError):
            spool.load(bad)


# -- writing ------------------------------------------------------------------------------------------

def test_commit_makes_message_visible_and_round_trips(tmp_path):
    spool = Spool(str(tmp_path))
    body = b"Subject: x\r\n\r\n" + b"line\r\n" * 1000
    env = store(spool, body, helo="mx.example", extra={"k": [1, 2]})
    assert spool.ids() == [env.queue_id]
    assert spool.load(env.queue_id) == env
    with spool.open_body(env.queue_id) as f:
        assert f.read() == body
    assert spool.body_size(env.queue_id) == len(body)
    assert listing(spool, "tmp") == []


def test_writer_counts_bytes_written(tmp_path):
    with Spool(str(tmp_path)).writer() as w:
        w.write(b"abc")
        w.write(b"defg")
        assert w.size == 7


def test_ids_are_in_arrival_order(tmp_path):
    spool = Spool(str(tmp_path))
    envs = [store(spool) for _ in range(5)]
    assert spool.ids() == [e.queue_id for e in envs]


def test_abort_leaves_nothing(tmp_path):
    spool = Spool(str(tmp_path))
    w = spool.writer()
    w.write(b"data")
    w.abort()
    w.abort()
    assert listing(spool, "tmp") == [] and listing(spool, "queue") == []


def test_exception_inside_writer_block_leaves_nothing(tmp_path):
    spool = Spool(str(tmp_path))
    with pytest.raises(RuntimeError):
        with spool.writer() as w:
            w.write(b"data" * 100000)
            raise RuntimeError("client went away")
    assert listing(spool, "tmp") == [] and listing(spool, "queue") == []


def test_writer_block_without_commit_leaves_nothing(tmp_path):
    spool = Spool(str(tmp_path))
    with spool.writer() as w:
        w.write(b"data")
    assert listing(spool, "tmp") == [] and listing(spool, "queue") == []


def test_commit_refuses_envelope_of_another_message(tmp_path):
    spool = Spool(str(tmp_path))
    with spool.writer() as w:
        w.write(b"data")
        with pytest.raises(ValueError):
            w.commit(make_env(new_queue_id()))
    assert listing(spool, "queue") == []


FSIZE_SCRIPT = r"""
import resource, signal, sys
from pmaster import spool as spool_module
from pmaster.envelope import Envelope, Recipient
from pmaster.errors import SpoolError
from pmaster.spool import Spool
directory, limit, body_kib, pad = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a too large file gives EFBIG instead of a signal
spool = Spool(directory)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
w = spool.writer()
stage = "write"
try:
    for _ in range(body_kib):
        w.write(b"x" * 1023 + b"\n")
    stage = "commit"
    rcpt = Recipient(address="b@example.net", original="b@example.net", mailer="relay", target="relay()")
    w.commit(Envelope(queue_id=w.queue_id, sender="a@example.org", recipients=[rcpt], arrival=0.0,
                      extra={"pad": "y" * pad}))
except SpoolError as exc:
    print("SpoolError", stage, exc)
    sys.exit(3)
print("committed")
"""


def test_body_write_failure_raises_spool_error_and_leaves_nothing(tmp_path):
    proc = run_python(FSIZE_SCRIPT, tmp_path, 16 * 1024, 256, 0)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith("SpoolError write"), proc.stdout
    spool = Spool(str(tmp_path))
    assert listing(spool, "tmp") == [] and listing(spool, "queue") == []


def test_envelope_write_failure_removes_the_body_already_queued(tmp_path):
    proc = run_python(FSIZE_SCRIPT, tmp_path, 16 * 1024, 8, 64 * 1024)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith("SpoolError commit"), proc.stdout
    spool = Spool(str(tmp_path))
    assert listing(spool, "tmp") == [] and listing(spool, "queue") == []


def test_concurrent_commits_all_land(tmp_path):
    spool = Spool(str(tmp_path))
    stored = {}
    guard = threading.Lock()

    def commit_some(i):
        for n in range(8):
            body = (f"thread {i} message {n}\r\n").encode() * 50
            env = store(spool, body)
            with guard:
                stored[env.queue_id] = (env, body)

    run_threads(commit_some, 16)
    assert spool.ids() == sorted(stored)
    assert len(stored) == 128
    for qid, (env, body) in stored.items():
        assert spool.load(qid) == env
        with spool.open_body(qid) as f:
            assert f.read() == body
    assert listing(spool, "tmp") == []


# -- group commit -------------------------------------------------------------------------------------

def test_group_sync_waits_for_a_sync_started_after_the_call():
    events = itertools.count()
    started = {}
    gens = itertools.count(1)

    def slow_sync():
        started[next(gens)] = next(events)
        time.sleep(0.005)

    group = GroupSync(slow_sync)
    checks = []
    guard = threading.Lock()

    def caller(i):
        for _ in range(10):
            entered = next(events)
            gen = group.sync()
            with guard:
                checks.append((entered, gen))

    run_threads(caller, 16)
    assert len(checks) == 160
    assert all(started[gen] > entered for entered, gen in checks)
    assert len(started) < 160  # callers shared syncs


def test_group_sync_failure_reaches_its_callers_and_later_syncs_recover():
    failing = [True]

    def sync():
        if failing[0]:
            raise OSError(5, "I/O error")

    group = GroupSync(sync)
    with pytest.raises(OSError):
        group.sync()
    failing[0] = False
    assert group.sync() == 2


def test_spool_without_group_commit_still_commits(tmp_path):
    spool = Spool(str(tmp_path), group_commit=False)
    env = store(spool)
    assert spool.load(env.queue_id) == env


# -- save and remove ----------------------------------------------------------------------------------

def test_commit_writes_one_file_per_message(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    assert listing(spool, "queue") == [env.queue_id + ".msg"]
    assert listing(spool, "tmp") == []


def test_record_holds_body_then_envelope_line_then_footer(tmp_path):
    spool = Spool(str(tmp_path))
    body = b"Subject: hi\r\n\r\nhello\r\n"
    env = store(spool, body)
    with open(spool.body_path(env.queue_id), "rb") as f:
        raw = f.read()
    assert raw.startswith(body)
    envelope_line, footer = raw[len(body):].split(b"\n")[:2]
    assert Envelope.from_json(envelope_line.decode()) == env
    assert footer == b"#pmaster-record body=%016d envelope=%010d" % (len(body), len(envelope_line) + 1)
    assert raw.endswith(footer + b"\n")


def test_body_readers_stop_at_the_end_of_the_body(tmp_path):
    spool = Spool(str(tmp_path))
    body = b"Subject: hi\r\n\r\n" + b"line\r\n" * 20000
    env = store(spool, body)
    with spool.open_body(env.queue_id) as f:
        assert f.read() == body
    with open_body_file(spool.body_path(env.queue_id)) as f:
        assert b"".join(iter(lambda: f.read(1000), b"")) == body
    with spool.open_body(env.queue_id) as f:
        assert list(f)[:2] == [b"Subject: hi\r\n", b"\r\n"]
    assert spool.body_size(env.queue_id) == body_file_size(spool.body_path(env.queue_id)) == len(body)


@pytest.mark.parametrize("margin", [-1, 0, 1])
def test_body_readers_are_exact_either_side_of_the_one_read_limit(tmp_path, monkeypatch, margin):
    spool = Spool(str(tmp_path))
    body = b"Subject: hi\r\n\r\n" + b"line\r\n" * 300
    env = store(spool, body)
    record = os.path.getsize(spool.body_path(env.queue_id))
    monkeypatch.setattr(spool_module, "_SMALL_RECORD", record + margin)
    with open_body_file(spool.body_path(env.queue_id)) as f:
        assert b"".join(iter(lambda: f.read(1000), b"")) == body


def test_body_reader_refuses_a_small_file_with_a_broken_trailer(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    path = spool.body_path(env.queue_id)
    with open(path, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"9999999999")
    with pytest.raises(OSError, match="not a spool record"):
        open_body_file(path)


def test_body_reader_refuses_a_file_that_is_no_record(tmp_path):
    path = tmp_path / "plain"
    path.write_bytes(b"Subject: hi\r\n\r\nno trailer\r\n")
    with pytest.raises(OSError, match="not a spool record"):
        open_body_file(str(path))
    with pytest.raises(OSError, match="not a spool record"):
        body_file_size(str(path))


def test_record_trailer_makes_a_readable_record(tmp_path):
    env = make_env(new_queue_id())
    path = tmp_path / "record"
    path.write_bytes(b"body\r\n" + record_trailer(6, env))
    with open_body_file(str(path)) as f:
        assert f.read() == b"body\r\n"


def test_save_replaces_envelope_without_touching_body(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    body_before = os.stat(spool.body_path(env.queue_id))
    env_path = os.path.join(spool.directory, "queue", env.queue_id + ".env")
    assert not os.path.exists(env_path)  # the record's own envelope serves until the first save
    time.sleep(0.01)
    for attempts in (3, 4):
        env.recipients[0].attempts = attempts
        env.recipients[0].last_reply = "451 4.7.1 try later"
        with spool.lock(env.queue_id):
            spool.save(env)
        assert spool.load(env.queue_id).recipients[0].attempts == attempts
    body_after = os.stat(spool.body_path(env.queue_id))
    assert (body_after.st_ino, body_after.st_mtime_ns) == (body_before.st_ino, body_before.st_mtime_ns)
    assert os.path.exists(env_path)
    assert listing(spool, "tmp") == []


def test_stamp_changes_with_every_save(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    stamps = [spool.stamp(env.queue_id)]
    for attempts in (1, 2):
        env.recipients[0].attempts = attempts
        with spool.lock(env.queue_id):
            spool.save(env)
        stamps.append(spool.stamp(env.queue_id))
    assert len(set(stamps)) == 3
    with spool.lock(env.queue_id):
        spool.remove(env.queue_id)
    with pytest.raises(OSError):
        spool.stamp(env.queue_id)


def test_the_stamp_a_lock_gives_is_the_spool_stamp_before_and_after_a_save(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    with spool.lock(env.queue_id) as lock:
        assert lock.stamp() == spool.stamp(env.queue_id)
        spool.save(env)
        assert lock.stamp() == spool.stamp(env.queue_id)
        assert lock.stamp()[0] == 1


def test_the_stamp_of_a_lock_on_a_removed_message_is_an_os_error(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    remove_locked(spool, env.queue_id)
    with spool.lock(env.queue_id) as lock:
        with pytest.raises(OSError):
            lock.stamp()


def test_save_of_unknown_message_is_a_queue_id_error(tmp_path):
    spool = Spool(str(tmp_path))
    with pytest.raises(QueueIdError):
        spool.save(make_env(new_queue_id()))
    assert listing(spool, "queue") == []


def test_remove_deletes_both_files(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    with spool.lock(env.queue_id):
        spool.save(env)
        spool.remove(env.queue_id)
    assert spool.ids() == [] and listing(spool, "queue") == []
    with pytest.raises(QueueIdError):
        spool.load(env.queue_id)
    with pytest.raises(QueueIdError):
        spool.remove(env.queue_id)


def test_remove_of_a_message_never_saved_needs_no_envelope_file(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    with spool.lock(env.queue_id):
        assert spool.stamp(env.queue_id)[0] == 0  # what lets the scheduler pass env_saved=False
        spool.remove(env.queue_id, env_saved=False)
    assert spool.ids() == [] and listing(spool, "queue") == []


def test_commit_records_the_body_length_as_the_envelope_size(tmp_path):
    spool = Spool(str(tmp_path))
    with spool.writer() as w:
        w.write(b"Received: by us\r\n")
        w.write(b"Subject: hi\r\n\r\nhello\r\n")
        env = make_env(w.queue_id, size=5)
        w.commit(env)
    assert env.size == body_file_size(spool.body_path(env.queue_id)) == 17 + 22
    assert spool.load(env.queue_id).size == 39


def test_commits_reuse_one_descriptor_for_the_queue_directory(tmp_path):
    spool = Spool(str(tmp_path))
    store(spool)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        store(spool)
    assert len(os.listdir("/proc/self/fd")) == before


# -- removals made durable in the background (the daemon's spool) -------------------------------------

def count_directory_syncs(spool, monkeypatch, gate=None):
    """Record every fsync of ``queue/``; with ``gate``, each waits until the gate is set."""
    calls = []
    real = spool._queue_sync._sync_fn

    def sync():
        if gate is not None:
            gate.wait(JOIN_TIMEOUT)
        calls.append(time.monotonic())
        real()

    monkeypatch.setattr(spool._queue_sync, "_sync_fn", sync)
    return calls


def remove_locked(spool, qid):
    with spool.lock(qid):
        spool.remove(qid)


def test_a_removal_syncs_the_queue_directory_before_it_returns(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path))
    env = store(spool)
    calls = count_directory_syncs(spool, monkeypatch)
    remove_locked(spool, env.queue_id)
    assert len(calls) == 1


def test_a_background_removal_returns_before_its_directory_sync(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path), background_removals=True)
    env = store(spool)
    gate = threading.Event()
    calls = count_directory_syncs(spool, monkeypatch, gate)
    remove_locked(spool, env.queue_id)  # returns although the directory sync cannot finish yet
    assert spool.ids() == []
    assert not spool.wait_removals_synced(0.2)
    gate.set()
    assert spool.wait_removals_synced(JOIN_TIMEOUT)
    assert len(calls) == 1


def test_a_background_removal_rides_along_the_directory_sync_of_a_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "_RIDE_ALONG_WAIT", JOIN_TIMEOUT)
    spool = Spool(str(tmp_path), background_removals=True)
    env = store(spool)
    calls = count_directory_syncs(spool, monkeypatch)
    remove_locked(spool, env.queue_id)
    store(spool)  # its commit fsyncs queue/ after the removal: that covers the removal too
    assert spool.wait_removals_synced(JOIN_TIMEOUT)
    assert len(calls) == 1


def test_a_background_removal_syncs_by_itself_when_no_commit_comes(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "_RIDE_ALONG_WAIT", 0.05)
    spool = Spool(str(tmp_path), background_removals=True)
    envs = [store(spool) for _ in range(3)]
    calls = count_directory_syncs(spool, monkeypatch)
    for env in envs:
        remove_locked(spool, env.queue_id)
    assert spool.wait_removals_synced(JOIN_TIMEOUT)
    assert 1 <= len(calls) <= 3


def test_a_failed_background_sync_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(spool_module, "_RIDE_ALONG_WAIT", 0.01)
    spool = Spool(str(tmp_path), background_removals=True)
    env = store(spool)

    def broken():
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool._queue_sync, "_sync_fn", broken)
    remove_locked(spool, env.queue_id)
    assert spool.wait_removals_synced(JOIN_TIMEOUT)
    assert "cannot sync the queue directory after removals" in caplog.text


# -- reusing removed records (the daemon's spool) -----------------------------------------------------

def test_a_spool_that_does_not_recycle_unlinks_removed_records(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    with spool.lock(env.queue_id):
        spool.remove(env.queue_id)
    assert listing(spool, "queue") == [] and listing(spool, "free") == []


def test_a_recycling_spool_keeps_removed_records_emptied_in_free(tmp_path):
    spool = Spool(str(tmp_path), recycle=True)
    env = store(spool, body=b"Subject: secret\r\n\r\ndelivered\r\n")
    with spool.lock(env.queue_id):
        spool.remove(env.queue_id)
    assert spool.ids() == [] and listing(spool, "queue") == []
    (kept,) = listing(spool, "free")
    assert os.path.getsize(os.path.join(spool.directory, "free", kept)) == 0
    with pytest.raises(QueueIdError):
        spool.load(env.queue_id)


def test_a_rested_record_file_becomes_the_next_message(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "_RECYCLE_AGE", 0.0)
    spool = Spool(str(tmp_path), recycle=True)
    old = store(spool, body=b"Subject: old\r\n\r\n" + b"x" * 5000 + b"\r\n")
    inode = os.stat(spool.body_path(old.queue_id)).st_ino
    with spool.lock(old.queue_id):
        spool.remove(old.queue_id)
    new = store(spool, body=b"Subject: new\r\n\r\nshort\r\n")
    assert os.stat(spool.body_path(new.queue_id)).st_ino == inode
    assert listing(spool, "free") == []
    with spool.open_body(new.queue_id) as f:
        assert f.read() == b"Subject: new\r\n\r\nshort\r\n"
    assert spool.load(new.queue_id).sender == new.sender


def test_a_removed_record_rests_before_reuse(tmp_path):
    spool = Spool(str(tmp_path), recycle=True)
    old = store(spool)
    inode = os.stat(spool.body_path(old.queue_id)).st_ino
    with spool.lock(old.queue_id):
        spool.remove(old.queue_id)
    new = store(spool)  # at once: whoever still reads the old record must not see this one
    assert os.stat(spool.body_path(new.queue_id)).st_ino != inode
    assert len(listing(spool, "free")) == 1


def test_a_full_pool_unlinks(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "_RECYCLE_MAX", 1)
    spool = Spool(str(tmp_path), recycle=True)
    envs = [store(spool) for _ in range(3)]
    for env in envs:
        with spool.lock(env.queue_id):
            spool.remove(env.queue_id)
    assert listing(spool, "queue") == [] and len(listing(spool, "free")) == 1


def test_files_kept_by_the_last_run_are_deleted_at_start(tmp_path):
    spool = Spool(str(tmp_path), recycle=True)
    env = store(spool)
    with spool.lock(env.queue_id):
        spool.remove(env.queue_id)
    assert len(listing(spool, "free")) == 1
    Spool(str(tmp_path), recycle=True)
    assert listing(spool, "free") == []


def test_a_body_reader_of_a_record_emptied_under_it_fails_instead_of_ending_early(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool, body=b"Subject: long\r\n\r\n" + b"y" * 200000 + b"\r\n")
    with spool.open_body(env.queue_id) as f:
        assert f.read(9) == b"Subject: "
        os.truncate(spool.body_path(env.queue_id), 0)
        with pytest.raises(OSError):
            f.read()


def test_a_free_name_linked_to_a_queued_record_goes_and_the_record_stays(tmp_path):
    spool = Spool(str(tmp_path), recycle=True)
    env = store(spool)
    os.link(spool.body_path(env.queue_id), os.path.join(spool.directory, "free", new_queue_id()))
    Spool(str(tmp_path), recycle=True)
    assert listing(spool, "free") == []
    assert spool.load(env.queue_id).queue_id == env.queue_id


def test_load_of_unknown_id_is_a_queue_id_error(tmp_path):
    with pytest.raises(QueueIdError):
        Spool(str(tmp_path)).load(new_queue_id())


# -- corrupt records and recovery ---------------------------------------------------------------------

def test_load_moves_corrupt_envelope_to_corrupt(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    with spool.lock(env.queue_id):
        spool.save(env)
    with open(os.path.join(spool.directory, "queue", env.queue_id + ".env"), "w") as f:
        f.write('{"version": 1, "queue_id": ')
    with pytest.raises(SpoolError) as info:
        spool.load(env.queue_id)
    assert not isinstance(info.value, QueueIdError)
    assert spool.ids() == [] and listing(spool, "queue") == []
    assert spool.corrupt_ids() == [env.queue_id]
    assert listing(spool, "corrupt") == [env.queue_id + ".env", env.queue_id + ".msg"]


def test_load_moves_record_with_broken_trailer_to_corrupt(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    with open(spool.body_path(env.queue_id), "r+b") as f:
        f.truncate(os.path.getsize(spool.body_path(env.queue_id)) - 5)
    with pytest.raises(SpoolError, match="unreadable record") as info:
        spool.load(env.queue_id)
    assert not isinstance(info.value, QueueIdError)
    assert spool.corrupt_ids() == [env.queue_id] and spool.ids() == []


def test_envelope_left_by_an_interrupted_removal_counts_as_removed(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    with spool.lock(env.queue_id):
        spool.save(env)
    os.unlink(spool.body_path(env.queue_id))  # a crash between the two unlinks of remove()
    assert not spool.exists(env.queue_id) and spool.ids() == []
    with pytest.raises(QueueIdError):
        spool.load(env.queue_id)
    assert spool.recover() == []
    assert listing(spool, "queue") == [] and spool.corrupt_ids() == []


def test_recover_moves_unreadable_envelope_to_corrupt(tmp_path):
    spool = Spool(str(tmp_path))
    good = store(spool)
    bad = store(spool)
    with spool.lock(bad.queue_id):
        spool.save(bad)
    with open(os.path.join(spool.directory, "queue", bad.queue_id + ".env"), "wb") as f:
        f.write(b"\xff\xfe not json")
    assert spool.recover() == [bad.queue_id]
    assert spool.ids() == [good.queue_id]
    assert spool.corrupt_ids() == [bad.queue_id]


def test_recover_quarantines_a_record_without_trailer(tmp_path):
    spool = Spool(str(tmp_path))
    good = store(spool)
    # A file in queue/ that no commit wrote, with another message still being written in tmp/.
    orphan = new_queue_id()
    with open(spool.body_path(orphan), "wb") as f:
        f.write(b"never acknowledged\r\n")
    unfinished = spool.writer()
    unfinished.write(b"partial")
    unfinished._drain()  # the partial body reaches tmp/
    assert spool.recover() == [orphan]
    assert spool.ids() == [good.queue_id]
    assert listing(spool, "tmp") == []
    assert spool.corrupt_ids() == [orphan]
    assert spool.load(good.queue_id) == good


# -- locks --------------------------------------------------------------------------------------------

LOCK_SCRIPT = r"""
import sys
from pmaster.spool import Spool
lk = Spool(sys.argv[1]).try_lock(sys.argv[2])
print("busy" if lk is None else "free")
"""


def test_lock_excludes_another_process(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    with spool.lock(env.queue_id):
        assert run_python(LOCK_SCRIPT, tmp_path, env.queue_id).stdout.strip() == "busy"
    assert run_python(LOCK_SCRIPT, tmp_path, env.queue_id).stdout.strip() == "free"


def test_lock_excludes_another_thread(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    outcome = []

    def other(_):
        outcome.append(spool.try_lock(env.queue_id))
        try:
            spool.lock(env.queue_id, timeout=0.1)
        except SpoolError as exc:
            outcome.append(exc)

    with spool.lock(env.queue_id):
        run_threads(other, 1)
    assert outcome[0] is None and isinstance(outcome[1], SpoolError)
    lk = spool.try_lock(env.queue_id)
    assert lk is not None
    with lk:
        assert lk.held
    assert not lk.held


def test_lock_waiter_of_a_removed_message_holds_a_lock_on_nothing(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    waiter_holds = threading.Event()
    seen = []

    def waiter(_):
        with spool.lock(env.queue_id) as lk:
            waiter_holds.set()
            seen.append(lk.held)
            try:
                spool.load(env.queue_id)
            except QueueIdError as exc:
                seen.append(exc)

    first = spool.lock(env.queue_id, timeout=5)
    thread = threading.Thread(target=waiter, args=(0,))
    thread.start()
    time.sleep(0.05)  # let the waiter block on the record we are about to unlink
    assert not waiter_holds.is_set()
    spool.remove(env.queue_id)
    first.release()
    assert waiter_holds.wait(JOIN_TIMEOUT)
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive()
    assert seen[0] is True and isinstance(seen[1], QueueIdError)


def test_lock_of_an_unknown_message_succeeds_and_load_says_so(tmp_path):
    spool = Spool(str(tmp_path))
    qid = new_queue_id()
    lk = spool.try_lock(qid)
    assert lk is not None and lk.held
    with lk:
        with pytest.raises(QueueIdError):
            spool.load(qid)
    assert not lk.held


# -- the trigger file and paths -------------------------------------------------------------------------


def test_trigger_path_is_in_the_spool_directory(tmp_path):
    spool = Spool(str(tmp_path))
    assert spool.trigger_path() == os.path.join(spool.directory, "trigger")


def test_touch_trigger_creates_the_file_and_always_moves_its_time_forward(tmp_path):
    spool = Spool(str(tmp_path))
    stamps = []
    for _ in range(5):
        spool.touch_trigger()
        stamps.append(os.stat(spool.trigger_path()).st_mtime_ns)
    assert stamps == sorted(set(stamps))


def test_touch_trigger_failure_is_logged_not_raised(tmp_path, caplog):
    spool = Spool(str(tmp_path))
    os.mkdir(spool.trigger_path())  # a directory cannot be opened for writing, not even by root
    spool.touch_trigger()
    assert "cannot touch" in caplog.text


def test_env_path_names_the_envelope_file_and_checks_the_id(tmp_path):
    spool = Spool(str(tmp_path))
    env = store(spool)
    assert spool.env_path(env.queue_id) == os.path.join(spool.directory, "queue", env.queue_id + ".env")
    with spool.lock(env.queue_id):
        spool.save(env)
    assert os.path.exists(spool.env_path(env.queue_id))
    with pytest.raises(QueueIdError):
        spool.env_path("../x")
