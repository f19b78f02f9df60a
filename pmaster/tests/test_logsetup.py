"""Log back-ends: the cached time stamp and the strftime file names agree with what logging would print."""

import logging
import time

from pmaster import logsetup


def record(created: float, msg: str = "QID: from=<a@b.test> size=1") -> logging.LogRecord:
    rec = logging.LogRecord("pmaster.smtpd", logging.INFO, __file__, 1, msg, None, None)
    rec.created = created
    rec.msecs = (created - int(created)) * 1000
    return rec


def test_cached_time_stamp_matches_the_standard_formatter_across_seconds():
    fmt = "%(asctime)s %(levelname)s: %(message)s"
    ours, plain = logsetup._Formatter(fmt), logging.Formatter(fmt)
    base = 1700000000.0
    for created in (base + 0.001, base + 0.999, base + 1.5, base + 1.25, base + 3600.75, base + 0.5):
        rec = record(created)
        assert ours.format(rec) == plain.format(rec)


def test_log_file_is_named_by_the_time_of_each_line(tmp_path):
    handler = logsetup.StrftimeFileHandler(str(tmp_path / "mail-%Y%m%d-%H%M%S.log"))
    handler.setFormatter(logsetup._Formatter("%(message)s"))
    base = float(int(time.time()))
    try:
        handler.handle(record(base + 0.2, "first"))
        handler.handle(record(base + 0.7, "same second"))
        handler.handle(record(base + 2.1, "two seconds later"))
    finally:
        handler.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [time.strftime("mail-%Y%m%d-%H%M%S.log", time.localtime(base + s)) for s in (0, 2)]
    assert (tmp_path / names[0]).read_text().splitlines() == ["first", "same second"]
    assert (tmp_path / names[1]).read_text().splitlines() == ["two seconds later"]
