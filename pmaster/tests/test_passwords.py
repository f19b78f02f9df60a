"""Password files (SPEC 10) and ``pmaster passwd`` (SPEC 1), with hashes made by real tools (doveadm, openssl)."""

import os
import select
import stat
import subprocess
import sys
import threading
import time

import pytest
from passlib.hash import argon2, bcrypt, pbkdf2_sha256

from pmaster import passwords
from pmaster.passwords import PasswordFile, PasswordFileError, delete_user, hash_password, set_password

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def tool(*argv):
    return subprocess.run(list(argv), stdout=subprocess.PIPE, check=True, universal_newlines=True,
                          timeout=60).stdout.strip()


def pmaster(*args, stdin=""):
    env = {k: v for k, v in os.environ.items() if k != "PMASTER_CONFIG"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "pmaster"] + list(args), input=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=env, timeout=60)


def pwfile(tmp_path, text):
    path = tmp_path / "passwd"
    path.write_text(text)
    return str(path)


REAL_HASHES = {
    "pmaster": lambda: hash_password("s3cret"),
    "passlib-pbkdf2-sha256": lambda: pbkdf2_sha256.hash("s3cret"),
    "openssl-sha512": lambda: tool("openssl", "passwd", "-6", "s3cret"),
    "openssl-sha256": lambda: tool("openssl", "passwd", "-5", "s3cret"),
    "doveadm-SHA512-CRYPT": lambda: tool("doveadm", "pw", "-s", "SHA512-CRYPT", "-p", "s3cret"),
    "doveadm-SHA256-CRYPT": lambda: tool("doveadm", "pw", "-s", "SHA256-CRYPT", "-p", "s3cret"),
    "doveadm-BLF-CRYPT": lambda: tool("doveadm", "pw", "-s", "BLF-CRYPT", "-p", "s3cret"),
    "doveadm-ARGON2ID": lambda: tool("doveadm", "pw", "-s", "ARGON2ID", "-p", "s3cret"),
    "doveadm-PBKDF2": lambda: tool("doveadm", "pw", "-s", "PBKDF2", "-p", "s3cret"),
    "python-bcrypt-2b": lambda: bcrypt.using(ident="2b", rounds=5).hash("s3cret"),
    "argon2-cffi": lambda: argon2.using(type="ID").hash("s3cret"),
}


@pytest.mark.parametrize("maker", sorted(REAL_HASHES))
def test_verify_accepts_right_password_for_hash_from(maker, tmp_path):
    pf = PasswordFile(pwfile(tmp_path, "alice:%s\n" % REAL_HASHES[maker]()))
    assert pf.problems() == []
    assert pf.verify("alice", "s3cret") is True


@pytest.mark.parametrize("maker", sorted(REAL_HASHES))
def test_verify_rejects_wrong_password_for_hash_from(maker, tmp_path):
    pf = PasswordFile(pwfile(tmp_path, "alice:%s\n" % REAL_HASHES[maker]()))
    assert pf.verify("alice", "s3cre") is False


def test_hash_password_is_passlib_pbkdf2_sha256_format():
    hashed = hash_password("pässword")
    assert hashed.startswith("$pbkdf2-sha256$%d$" % passwords.ROUNDS)
    assert pbkdf2_sha256.verify("pässword", hashed)
    assert not pbkdf2_sha256.verify("password", hashed)


def test_hash_password_salts_every_hash():
    assert hash_password("x") != hash_password("x")


def test_dovecot_passwd_file_line_takes_second_field(tmp_path):
    hashed = tool("doveadm", "pw", "-s", "SHA512-CRYPT", "-p", "s3cret")
    pf = PasswordFile(pwfile(tmp_path, "bob:%s:1000:1000::/home/bob::userdb_quota_rule=*:storage=1G\n" % hashed))
    assert pf.verify("bob", "s3cret") and pf.users() == ["bob"]


def test_comments_and_blank_lines_are_skipped(tmp_path):
    pf = PasswordFile(pwfile(tmp_path, "# users\n\n   \nalice:%s\n  # more\n" % hash_password("a")))
    assert pf.users() == ["alice"]


def test_unknown_user_is_rejected_and_costs_one_hash(tmp_path, monkeypatch):
    pf = PasswordFile(pwfile(tmp_path, "alice:%s\n" % hash_password("a")))
    calls = []
    real = passwords._verify_pbkdf2_sha256
    monkeypatch.setattr(passwords, "_verify_pbkdf2_sha256", lambda h, p: calls.append(h) or real(h, p))
    assert pf.verify("mallory", "a") is False
    assert len(calls) == 1 and calls[0].startswith("$pbkdf2-sha256$%d$" % passwords.ROUNDS)


def test_user_with_unverifiable_hash_is_rejected_and_costs_one_hash(tmp_path, monkeypatch):
    pf = PasswordFile(pwfile(tmp_path, "carol:{PLAIN}a\n"))
    calls = []
    real = passwords._verify_pbkdf2_sha256
    monkeypatch.setattr(passwords, "_verify_pbkdf2_sha256", lambda h, p: calls.append(h) or real(h, p))
    assert pf.verify("carol", "a") is False and len(calls) == 1


@pytest.mark.parametrize("field, why", [
    ("{PLAIN}secret", "{PLAIN} is not supported"),
    ("$1$abcdefgh$Q4cpqlEFD3zlvPVDGJ4jt1", "unknown hash type"),  # MD5-crypt
    ("{SHA512-CRYPT}$5$abc$def", "does not hold"),
    ("$6$salt$short", "malformed"),
    ("{PBKDF2}$2$x$y$z", "malformed Dovecot PBKDF2"),
    ("plaintext", "unknown hash type"),
])
def test_problems_names_lines_that_cannot_verify(field, why, tmp_path):
    path = pwfile(tmp_path, "# head\nalice:%s\nbob:%s\n" % (hash_password("a"), field))
    problems = PasswordFile(path).problems()
    assert len(problems) == 1 and problems[0].startswith("%s:3: user bob: " % path) and why in problems[0]


def test_line_without_colon_is_an_error_with_line_number(tmp_path):
    path = pwfile(tmp_path, "alice:%s\njustaname\n" % hash_password("a"))
    with pytest.raises(PasswordFileError, match=r"^%s:2: expected user:HASH$" % path):
        PasswordFile(path)


def test_same_user_twice_is_an_error(tmp_path):
    path = pwfile(tmp_path, "a:%s\na:%s\n" % (hash_password("a"), hash_password("b")))
    with pytest.raises(PasswordFileError, match=":2: user 'a' given twice"):
        PasswordFile(path)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(PasswordFileError, match="cannot read password file .*No such file"):
        PasswordFile(str(tmp_path / "nope"))


def test_verify_rereads_file_after_set_password(tmp_path):
    path = pwfile(tmp_path, "alice:%s\n" % hash_password("a"))
    pf = PasswordFile(path)
    set_password(path, "bob", "b")
    set_password(path, "alice", "new")
    assert pf.verify("bob", "b") and pf.verify("alice", "new") and not pf.verify("alice", "a")


def test_verify_rereads_file_rewritten_in_place(tmp_path):
    path = pwfile(tmp_path, "alice:%s\n" % hash_password("a"))
    pf = PasswordFile(path)
    st = os.stat(path)
    with open(path, "w") as f:  # same inode, same size: only mtime_ns tells
        f.write("alice:%s\n" % hash_password("b"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert pf.verify("alice", "b")


def test_verify_fails_closed_when_file_breaks(tmp_path):
    path = pwfile(tmp_path, "alice:%s\n" % hash_password("a"))
    pf = PasswordFile(path)
    os.unlink(path)
    with pytest.raises(PasswordFileError):
        pf.verify("alice", "a")


def test_set_password_creates_file_0600(tmp_path):
    path = str(tmp_path / "new")
    set_password(path, "alice", "a")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and PasswordFile(path).verify("alice", "a")


def test_set_password_keeps_mode_comments_and_other_users(tmp_path):
    path = pwfile(tmp_path, "# site users\n\nalice:%s\nbob:%s\n" % (hash_password("a"), hash_password("b")))
    os.chmod(path, 0o640)
    set_password(path, "alice", "new")
    lines = open(path).read().splitlines()
    assert lines[:2] == ["# site users", ""] and lines[2].startswith("alice:$pbkdf2-sha256$")
    assert lines[3].startswith("bob:") and stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert PasswordFile(path).verify("bob", "b")


def test_set_password_on_dovecot_line_writes_hash_dovecot_verifies(tmp_path):
    old = tool("doveadm", "pw", "-s", "BLF-CRYPT", "-p", "old")
    path = pwfile(tmp_path, "bob:%s:1000:1000::/home/bob\n" % old)
    set_password(path, "bob", "new")
    user, field, rest = open(path).read().rstrip("\n").split(":", 2)
    assert (user, rest) == ("bob", "1000:1000::/home/bob") and field.startswith("{SHA512-CRYPT}$6$")
    proc = subprocess.run(["doveadm", "pw", "-t", field, "-p", "new"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert proc.returncode == 0 and "verified" in proc.stdout


def test_set_password_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "pw")
    set_password(path, "alice", "a")
    set_password(path, "alice", "b")
    assert os.listdir(str(tmp_path)) == ["pw"]


def test_set_password_refuses_bad_user_names(tmp_path):
    for bad in ("", "a:b", "a b", "#a", "a\nb"):
        with pytest.raises(PasswordFileError, match="bad user name"):
            set_password(str(tmp_path / "pw"), bad, "x")
    assert not os.path.exists(str(tmp_path / "pw"))


def test_set_password_refuses_to_rewrite_broken_file(tmp_path):
    path = pwfile(tmp_path, "broken line\n")
    with pytest.raises(PasswordFileError, match=":1: expected user:HASH"):
        set_password(path, "alice", "a")
    assert open(path).read() == "broken line\n"


def test_concurrent_set_password_loses_no_user(tmp_path):
    path = str(tmp_path / "pw")
    threads = [threading.Thread(target=set_password, args=(path, "u%d" % i, "p%d" % i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert PasswordFile(path).users() == sorted("u%d" % i for i in range(8))


def test_delete_user_removes_only_that_user(tmp_path):
    path = pwfile(tmp_path, "alice:%s\nbob:%s\n" % (hash_password("a"), hash_password("b")))
    assert delete_user(path, "alice") is True
    assert PasswordFile(path).users() == ["bob"]


def test_delete_unknown_user_leaves_file_untouched(tmp_path):
    path = pwfile(tmp_path, "alice:%s\n" % hash_password("a"))
    before = os.stat(path)
    assert delete_user(path, "zed") is False
    assert os.stat(path).st_ino == before.st_ino


# -- pmaster passwd


def test_cli_passwd_adds_user_from_stdin(tmp_path):
    path = str(tmp_path / "pw")
    proc = pmaster("passwd", "--file", path, "alice", stdin="s3cret\n")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and PasswordFile(path).verify("alice", "s3cret")
    assert "s3cret" not in open(path).read()


def test_cli_passwd_defaults_to_webadmin_password_file(tmp_path):
    cfg = tmp_path / "p.cf"
    cfg.write_text("[core]\n  hostname = h.test\n[webadmin]\n  listen-port = 127.0.0.1:8025\n"
                   "  password-file = web.users\n")
    proc = pmaster("passwd", "-c", str(cfg), "admin", stdin="pw\n")
    assert proc.returncode == 0, proc.stderr
    assert PasswordFile(str(tmp_path / "web.users")).verify("admin", "pw")


def test_cli_passwd_without_file_or_webadmin_names_the_fix(tmp_path):
    cfg = tmp_path / "p.cf"
    cfg.write_text("[core]\n  hostname = h.test\n")
    proc = pmaster("passwd", "-c", str(cfg), "admin", stdin="pw\n")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "no [webadmin] password-file" in proc.stderr and "--file" in proc.stderr


def test_cli_passwd_delete(tmp_path):
    path = pwfile(tmp_path, "alice:%s\nbob:%s\n" % (hash_password("a"), hash_password("b")))
    assert pmaster("passwd", "--file", path, "--delete", "alice").returncode == 0
    assert PasswordFile(path).users() == ["bob"]


def test_cli_passwd_delete_unknown_user_is_one_line_error(tmp_path):
    path = pwfile(tmp_path, "alice:%s\n" % hash_password("a"))
    proc = pmaster("passwd", "--file", path, "--delete", "zed")
    assert proc.returncode == 1 and proc.stderr == "pmaster: passwd: no user 'zed' in %s\n" % path


def test_cli_passwd_empty_password_changes_nothing(tmp_path):
    path = str(tmp_path / "pw")
    proc = pmaster("passwd", "--file", path, "alice", stdin="\n")
    assert proc.returncode == 1 and "empty password" in proc.stderr and not os.path.exists(path)


def test_cli_passwd_unwritable_directory_is_one_line_error(tmp_path):
    proc = pmaster("passwd", "--file", str(tmp_path / "no" / "such" / "pw"), "alice", stdin="x\n")
    assert proc.returncode == 1 and proc.stderr.startswith("pmaster: cannot open directory")
    assert "Traceback" not in proc.stderr


def _run_on_pty(argv, answers, timeout=30.0):
    """Run argv with a terminal as its controlling tty; type each answer after each prompt. Returns (rc, output)."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover (child)
        os.environ["PYTHONPATH"] = ROOT
        os.execv(sys.executable, [sys.executable, "-m", "pmaster"] + argv)
    out, pending, deadline = b"", list(answers), time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if pending and out.rstrip().endswith(b"password:"):
                os.write(fd, pending.pop(0).encode() + b"\n")
                out += b"<typed>"
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.WEXITSTATUS(status), out.decode()


def test_cli_passwd_on_terminal_asks_twice(tmp_path):
    path = str(tmp_path / "pw")
    rc, out = _run_on_pty(["passwd", "--file", path, "alice"], ["tty-pw", "tty-pw"])
    assert rc == 0, out
    assert out.count("password:") == 2 and "tty-pw" not in out
    assert PasswordFile(path).verify("alice", "tty-pw")


def test_cli_passwd_on_terminal_mismatch_changes_nothing(tmp_path):
    path = str(tmp_path / "pw")
    rc, out = _run_on_pty(["passwd", "--file", path, "alice"], ["one", "two"])
    assert rc == 1 and "do not match" in out and not os.path.exists(path)
