"""`run --ray`'s attempts (`foreground.run_with_retries`) follow the scheduler's retry rule."""

from __future__ import annotations

import pytest

from evalfleet.orchestrator.foreground import run_with_retries
from evalfleet.orchestrator.recovery import RecoveryOptions
from evalfleet.types import EvalfleetError, InfrastructureError, NodeLost, UsageError


class Attempts:
    """Raises each of `failures` in turn, then returns "result"."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "result"


def _run(attempt, options=RecoveryOptions(max_attempts=3, backoff_base_s=30.0)):
    lines, sleeps = [], []
    try:
        return run_with_retries(attempt, options, say=lines.append, sleep=sleeps.append), lines, sleeps
    except Exception as error:
        return error, lines, sleeps


def test_a_lost_node_is_retried_at_once_with_one_line_per_retry():
    attempt = Attempts(NodeLost("node abc was lost"), NodeLost("node def was lost"))
    result, lines, sleeps = _run(attempt)
    assert result == "result" and attempt.calls == 3 and sleeps == [0.0, 0.0]
    assert lines == ["attempt 1 of 3 failed (node abc was lost); retrying in 0s from the request cache",
                     "attempt 2 of 3 failed (node def was lost); retrying in 0s from the request cache"]


def test_the_last_attempt_s_failure_is_raised_once_attempts_are_used_up():
    attempt = Attempts(*(NodeLost(f"lost {n}") for n in range(5)))
    error, lines, _ = _run(attempt)
    assert isinstance(error, NodeLost) and str(error) == "lost 2" and error.exit_code == 75
    assert attempt.calls == 3 and len(lines) == 2


def test_other_infrastructure_failures_retry_at_once_then_back_off_as_the_scheduler_does():
    attempt = Attempts(InfrastructureError("replica 0 did not finish batch 3 in 900s"), TimeoutError("slow"),
                       InfrastructureError("no slot"))
    result, lines, sleeps = _run(attempt, RecoveryOptions(max_attempts=4, backoff_base_s=30.0))
    assert result == "result" and sleeps == [0.0, 30.0, 60.0] and len(lines) == 3


def test_an_attempt_that_computed_something_ends_the_streak():
    """Failures after progress are no crash loop: each is a first failure again, retried at once."""
    attempt = Attempts(TimeoutError("slow"), TimeoutError("slow"), TimeoutError("slow"))
    computed = iter([True, False, True])
    lines, sleeps = [], []
    result = run_with_retries(attempt, RecoveryOptions(max_attempts=4, backoff_base_s=30.0), say=lines.append,
                              sleep=sleeps.append, progressed=lambda: next(computed))
    assert result == "result" and sleeps == [0.0, 30.0, 0.0]


@pytest.mark.parametrize("failure", [UsageError("no such task"), EvalfleetError("no tp plan for gpt2"),
                                     ValueError("a bug")])
def test_what_a_retry_would_repeat_is_raised_at_once(failure):
    attempt = Attempts(failure)
    error, lines, sleeps = _run(attempt)
    assert error is failure and attempt.calls == 1 and lines == [] and sleeps == []
