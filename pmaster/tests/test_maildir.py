"""``pmaster deliver --maildir``: files land in new/, names are validated, sysexits codes."""

import io
import os
import stat
import subprocess
import sys

import pytest

import pmaster
from pmaster.maildir import deliver_to_maildir, valid_user

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pmaster.__file__)))
MESSAGE = b"Return-Path: <a@example.org>\nSubject: hi\n\nbody\n"


def run(args, data=MESSAGE):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "pmaster.maildir"] + [str(a) for a in args], input=data,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=30)


def new_files(base, user):
    return sorted(os.listdir(os.path.join(str(base), user, "new")))


def test_message_lands_in_new_for_each_user(tmp_path):
    proc = run(["--maildir", tmp_path, "joe", "ann"])
    assert (proc.returncode, proc.stderr) == (0, b"")
    for user in ("joe", "ann"):
        [name] = new_files(tmp_path, user)
        assert (tmp_path / user / "new" / name).read_bytes() == MESSAGE
        assert os.listdir(str(tmp_path / user / "tmp")) == []
        assert os.path.isdir(str(tmp_path / user / "cur"))


def test_maildir_directories_are_private(tmp_path):
    run(["--maildir", tmp_path, "joe"])
    for sub in ("", "tmp", "new", "cur"):
        assert stat.S_IMODE(os.stat(str(tmp_path / "joe" / sub)).st_mode) == 0o700
    [name] = new_files(tmp_path, "joe")
    assert stat.S_IMODE(os.stat(str(tmp_path / "joe" / "new" / name)).st_mode) == 0o600


def test_domain_part_is_dropped(tmp_path):
    assert run(["--maildir", tmp_path, "joe@example.org"]).returncode == 0
    assert len(new_files(tmp_path, "joe")) == 1


def test_same_user_twice_gets_one_copy(tmp_path):
    assert run(["--maildir", tmp_path, "joe", "joe@example.org"]).returncode == 0
    assert len(new_files(tmp_path, "joe")) == 1


def test_each_delivery_gets_a_unique_name(tmp_path):
    run(["--maildir", tmp_path, "joe"])
    run(["--maildir", tmp_path, "joe"])
    names = new_files(tmp_path, "joe")
    assert len(names) == 2
    assert all(":" not in n and "/" not in n for n in names)


@pytest.mark.parametrize("name", ["../etc", ".hidden", "a/b", "", "@example.org", "a\nb", "..", "x/../../y@z"])
def test_bad_user_name_exits_67_and_stores_nothing(tmp_path, name):
    base = tmp_path / "mail"
    proc = run(["--maildir", base, "good", name])
    assert proc.returncode == 67
    assert proc.stderr.count(b"\n") == 1 and proc.stderr.startswith(b"pmaster deliver: ")
    assert not base.exists()


def test_nul_in_user_name_is_refused():
    with pytest.raises(ValueError):
        valid_user("a\0b")


@pytest.mark.parametrize("args", [[], ["--maildir"], ["joe"], ["--maildir", "/tmp/x"], ["--bogus", "x", "joe"]])
def test_usage_error_exits_64(args):
    proc = run(args)
    assert proc.returncode == 64
    assert proc.stderr.startswith(b"pmaster deliver: ")


def test_io_error_exits_75(tmp_path):
    base = tmp_path / "not-a-directory"
    base.write_bytes(b"")
    proc = run(["--maildir", base, "joe"])
    assert proc.returncode == 75
    assert b"cannot store message" in proc.stderr and proc.stderr.count(b"\n") == 1


def test_deliver_to_maildir_returns_path_in_new(tmp_path):
    path = deliver_to_maildir(str(tmp_path), "ann@x.org", io.BytesIO(MESSAGE))
    assert os.path.dirname(path) == str(tmp_path / "ann" / "new")
    with open(path, "rb") as f:
        assert f.read() == MESSAGE


def test_large_message_is_stored_whole(tmp_path):
    data = MESSAGE + b"x" * (3 * 1024 * 1024) + b"\n"
    assert run(["--maildir", tmp_path, "joe", "ann"], data=data).returncode == 0
    for user in ("joe", "ann"):
        [name] = new_files(tmp_path, user)
        assert (tmp_path / user / "new" / name).read_bytes() == data
