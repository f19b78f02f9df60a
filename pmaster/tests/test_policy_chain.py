"""The policy chain (pmaster/policy/chain.py): order, first refusal, DEFER_IF_*, failures, resources."""

import logging

import pytest

from pmaster.errors import PmasterError
from pmaster.policy import chain as chain_mod
from pmaster.policy.chain import ORDER, Chain, Check, Outcome, Resources
from pmaster.reply import Reply


class _Fixed(Check):
    def __init__(self, name, answer, calls, stages=("rcpt",), action=None):
        self.name = name
        self.answer = answer
        self.calls = calls
        self.stages = frozenset(stages)
        self.action = action

    def check(self, stage, view, outcome):
        self.calls.append(self.name)
        if self.action is not None:
            self.action(outcome)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


REJECT = Reply(550, "5.7.1", "no")
DEFER = Reply(450, "4.7.1", "later")


def _chain(*checks):
    return Chain({"rcpt": list(checks)})


def test_spec_order_of_positions_per_stage():
    assert ORDER["rcpt"] == ("dnsbl", "policy", "policy_service", "verify")
    assert ORDER["mail"] == ("spf", "policy")
    assert ORDER["connect"] == ORDER["helo"] == ORDER["data"] == ("policy",)


def test_first_refusal_answers_and_later_checks_are_not_asked():
    calls = []
    c = _chain(_Fixed("dnsbl", None, calls), _Fixed("policy", REJECT, calls), _Fixed("verify", DEFER, calls))
    verdict = c.evaluate("rcpt", None, Outcome())
    assert (verdict.reply, verdict.reason, calls) == (REJECT, "policy", ["dnsbl", "policy"])


def test_empty_stage_answers_nothing():
    assert _chain().run("rcpt", None, Outcome()) is None
    assert Chain({}).stages == frozenset()


def test_two_hundred_reply_skips_the_later_checks_of_the_stage():
    calls = []
    ok = Reply(250, "2.1.5", "fine")
    c = _chain(_Fixed("policy", ok, calls), _Fixed("verify", REJECT, calls))
    assert c.run("rcpt", None, Outcome()) == ok
    assert calls == ["policy"]


def test_defer_if_permit_answers_450_at_the_end_of_the_stage():
    calls = []
    c = _chain(_Fixed("policy_service", None, calls, action=lambda o: o.defer_if_permit()),
               _Fixed("verify", None, calls))
    verdict = c.evaluate("rcpt", None, Outcome())
    assert (verdict.reply.code, verdict.reply.enhanced, verdict.reason) == (450, "4.7.1", "policy_service")


def test_defer_if_permit_yields_to_a_later_refusal():
    c = _chain(_Fixed("policy_service", None, [], action=lambda o: o.defer_if_permit()),
               _Fixed("verify", REJECT, []))
    assert c.run("rcpt", None, Outcome()) == REJECT


def test_defer_if_reject_turns_a_later_5xx_into_450():
    pending = Reply(450, "4.7.1", "greylisted maybe")
    c = _chain(_Fixed("policy_service", None, [], action=lambda o: o.defer_if_reject(pending)),
               _Fixed("verify", REJECT, []))
    assert c.run("rcpt", None, Outcome()) == pending


def test_defer_if_reject_leaves_a_later_4xx_alone():
    c = _chain(_Fixed("policy_service", None, [], action=lambda o: o.defer_if_reject()), _Fixed("verify", DEFER, []))
    assert c.run("rcpt", None, Outcome()) == DEFER


def test_defer_if_reject_without_a_later_refusal_accepts():
    c = _chain(_Fixed("policy_service", None, [], action=lambda o: o.defer_if_reject()))
    assert c.run("rcpt", None, Outcome()) is None


def test_pending_defers_do_not_leak_into_the_next_stage():
    outcome = Outcome()
    c = Chain({"rcpt": [_Fixed("policy_service", REJECT, [], action=lambda o: o.defer_if_permit())],
               "data": [_Fixed("policy", None, [], stages=("data",))]})
    assert c.run("rcpt", None, outcome) == REJECT
    assert c.run("data", None, outcome) is None


def test_a_check_that_raises_answers_451_4_3_0_and_logs_the_traceback(caplog):
    c = _chain(_Fixed("policy", RuntimeError("boom"), []))
    with caplog.at_level(logging.ERROR, logger="pmaster.policy"):
        reply = c.run("rcpt", None, Outcome())
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert "boom" not in reply.text
    assert "RuntimeError: boom" in caplog.text


def test_close_hooks_run_once_even_when_one_fails():
    ran = []
    outcome = Outcome()
    outcome.on_close(lambda: 1 / 0)
    outcome.on_close(lambda: ran.append(1))
    outcome.close()
    outcome.close()
    assert ran == [1]


class _Closable:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def test_resources_survive_a_build_that_asks_for_them_and_close_otherwise():
    res = Resources()
    kept = res.get("a", _Closable)
    dropped = res.get("b", _Closable)
    res.sweep()
    assert res.get("a", _Closable) is kept
    res.sweep()
    assert not kept.closed and dropped.closed


def test_a_factory_problem_is_a_pmaster_error(monkeypatch):
    def broken(smtpd, config, resources):
        raise PmasterError("[smtpd x] broken")

    monkeypatch.setattr(chain_mod, "FACTORIES", {"policy": ["%s:broken" % __name__]})
    monkeypatch.setitem(globals(), "broken", broken)

    class _Cfg:
        smtpd = {"x": object()}

    with pytest.raises(PmasterError, match="broken"):
        chain_mod.build_chains(_Cfg(), Resources())
