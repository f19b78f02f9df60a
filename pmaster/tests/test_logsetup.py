"""Log back-ends: the cached time stamp and the strftime file names agree with what logging would print."""

import io
import logging
import re
import time

import pytest

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


# -- EventLog: the per-message lines without a LogRecord ---------------------------------------------------


@pytest.fixture
def private_logger(monkeypatch):
    """A logger outside the pmaster tree that does not propagate to pytest's capturing root handler."""

    def make(name: str, handler: logging.Handler) -> logging.Logger:
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", [logsetup._Async(handler)])
        monkeypatch.setattr(logger, "propagate", False)
        logger.setLevel(logging.INFO)
        return logger

    return make


def test_event_line_is_the_line_a_record_gives(tmp_path, private_logger):
    handler = logsetup.StrftimeFileHandler(str(tmp_path / "mail.log"))
    handler.setFormatter(logsetup._Formatter(logsetup._FORMAT_FILE))
    logger = private_logger("pmtest.events.same", handler)
    try:
        assert logsetup._plain_targets(logger) == [handler]  # the cheap path is taken
        logsetup.EventLog(logger.name).info("connect from [%s]:%s", "127.0.0.1", 2525)
        logger.info("connect from [%s]:%s", "127.0.0.1", 2525)
        logsetup.flush()
    finally:
        handler.close()
    event, record = (tmp_path / "mail.log").read_text().splitlines()
    stamp = len("2026-01-01 00:00:00,000 ")
    assert event[stamp:] == record[stamp:] == "pmtest.events.same[%d]: INFO: connect from [127.0.0.1]:2525" % (
        logsetup._pid[0])
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} $", event[:stamp])


def test_event_goes_through_the_logger_when_another_handler_listens(private_logger, monkeypatch):
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = private_logger("pmtest.events.foreign", logging.NullHandler())
    monkeypatch.setattr(logger, "handlers", logger.handlers + [Keep()])
    assert logsetup._plain_targets(logger) is None
    logsetup.EventLog(logger.name).info("%s: from=<%s>", "QID", "a@b.test")
    assert seen == ["QID: from=<a@b.test>"]


def test_event_reaches_a_stream_handler_as_a_formatted_line(private_logger):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logger = private_logger("pmtest.events.stream", handler)
    logsetup.EventLog(logger.name).info("disconnect from [%s]", "::1")
    logsetup.flush()
    assert stream.getvalue() == "pmtest.events.stream INFO disconnect from [::1]\n"


def test_flush_returns_after_every_queued_event_is_written(tmp_path, private_logger):
    handler = logsetup.StrftimeFileHandler(str(tmp_path / "mail.log"))
    handler.setFormatter(logsetup._Formatter(logsetup._FORMAT_FILE))
    logger = private_logger("pmtest.events.many", handler)
    events = logsetup.EventLog(logger.name)
    try:
        for n in range(3000):  # several of the writer's batches
            events.info("line %d", n)
        logsetup.flush()
        lines = (tmp_path / "mail.log").read_text().splitlines()
    finally:
        handler.close()
    assert [line.rsplit(" ", 1)[1] for line in lines] == [str(n) for n in range(3000)]


def test_event_below_the_logger_level_is_dropped(tmp_path, private_logger):
    handler = logsetup.StrftimeFileHandler(str(tmp_path / "mail.log"))
    logger = private_logger("pmtest.events.quiet", handler)
    logger.setLevel(logging.WARNING)
    try:
        logsetup.EventLog(logger.name).info("not written")
        logsetup.flush()
    finally:
        handler.close()
    assert not (tmp_path / "mail.log").exists()


def test_event_with_a_bad_format_is_reported_by_logging_not_raised(private_logger, capsys):
    logger = private_logger("pmtest.events.bad", logging.NullHandler())
    logsetup.EventLog(logger.name).info("%s and %s", "only one")  # must not raise into the session
    assert "only one" in capsys.readouterr().err  # logging's own report of the broken call
