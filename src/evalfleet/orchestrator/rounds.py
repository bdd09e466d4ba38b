"""The scheduler's loop of rounds: a fault in one round is never the scheduler's end.

A round that raises (a store locked past its busy timeout, a full disk, a log folder that
cannot be made, a Ray cluster that does not answer) is logged with its traceback to the
`evalfleet.scheduler` logger and in one line to the console; the next round comes later
(doubling from the interval up to `ROUND_BACKOFF_MAX_S`, back to the interval after a good
round) and first reconciles what the failed one may have left half-done: a job placed but
never launched, an exit collected but not settled. Only `stop` (the signal handlers) ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from evalfleet.types import EvalfleetError

if TYPE_CHECKING:
    from evalfleet.orchestrator.scheduler import DistributedEvaluationOrchestrator

ROUND_BACKOFF_MAX_S = 30.0

log = logging.getLogger("evalfleet.scheduler")


async def run_rounds(
    orchestrator: DistributedEvaluationOrchestrator,
    interval_s: float,
    stop: asyncio.Event,
    say: Callable[[str], None] = lambda line: None,
    after_round: Callable[[], None] = lambda: None,
) -> None:
    """Round after round until `stop` is set. `after_round` runs inside each round, so its
    failures are the round's."""
    delay, reconciled = interval_s, False
    while not stop.is_set():
        try:
            if not reconciled:
                requeued = orchestrator.reconcile()
                reconciled = True
                if requeued:
                    say(f"requeued {len(requeued)} job(s) whose process was gone: {', '.join(requeued)}")
            await orchestrator.run_once()
            after_round()
            delay = interval_s
        except EvalfleetError as error:  # a race with another process; the next round sees the new state
            reconciled = False
            say(f"round skipped: {error}")
        except Exception as error:
            reconciled = False
            delay = min(max(2 * delay, interval_s), ROUND_BACKOFF_MAX_S)
            log.error("scheduling round failed; next round in %.1fs", delay, exc_info=True)
            first_line = next(iter(str(error).strip().splitlines()), "")
            say(f"round failed ({type(error).__name__}: {first_line}); next round in {delay:.1f}s")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
