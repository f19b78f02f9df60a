"""The Reply value: rendering, and that rendering once for reuse changes nothing about the value."""

import email.utils

from pmaster import reply as R
from pmaster.reply import Reply
from pmaster.smtpd import _date_now


def test_multiline_reply_renders_continuation_lines():
    assert Reply(250, None, "mx.test\nPIPELINING").to_bytes() == b"250-mx.test\r\n250 PIPELINING\r\n"


def test_rendered_reply_stays_equal_and_hashable():
    fresh = Reply(250, "2.1.0", "Sender OK")
    assert R.SENDER_OK.to_bytes() == R.SENDER_OK.to_bytes() == b"250 2.1.0 Sender OK\r\n"
    assert R.SENDER_OK == fresh and hash(R.SENDER_OK) == hash(fresh)
    assert str(R.SENDER_OK) == "250 2.1.0 Sender OK"


def test_received_date_is_an_rfc5322_date_of_now():
    parsed = email.utils.parsedate_to_datetime(_date_now())
    assert abs(parsed.timestamp() - email.utils.parsedate_to_datetime(email.utils.formatdate(localtime=True))
               .timestamp()) <= 1
