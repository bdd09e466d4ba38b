"""lm-eval's environment report, gathered once per process in the background.

`simple_evaluate` ends by describing the machine (`torch.utils.collect_env`, which runs pip,
nvidia-smi and friends) and the git commit: seconds of subprocesses on every run, after the
work is done. Here they run once, in a thread started while the model loads, and every
evaluation in the process gets the same report.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_lock = threading.Lock()
_report: Future | None = None


def _gather() -> dict[str, Any]:
    from lm_eval.loggers.utils import add_env_info

    from evalfleet.tasks.noise import quiet_git_commit_hash

    report: dict[str, Any] = {"git_hash": quiet_git_commit_hash()}
    add_env_info(report)
    return report


def start_gathering() -> None:
    """Begin gathering the report (once per process); cheap to call again."""
    global _report
    with _lock:
        if _report is None:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evalfleet-env")
            _report = pool.submit(_gather)
            pool.shutdown(wait=False)


@contextlib.contextmanager
def _environment_hooks(add_env_info: Callable[[dict], None], git_hash: Callable[[], str | None]) -> Iterator[None]:
    """Within the block, `simple_evaluate` describes the environment with these two functions."""
    from lm_eval import evaluator

    saved = evaluator.add_env_info, evaluator.get_git_commit_hash
    evaluator.add_env_info, evaluator.get_git_commit_hash = add_env_info, git_hash
    try:
        yield
    finally:
        evaluator.add_env_info, evaluator.get_git_commit_hash = saved


@contextlib.contextmanager
def gathered_environment() -> Iterator[None]:
    """Within the block, lm-eval's `simple_evaluate` takes the report gathered in the background."""
    start_gathering()
    assert _report is not None
    report = _report
    with _environment_hooks(
        lambda storage: storage.update({k: v for k, v in report.result().items() if k != "git_hash"}),
        lambda: report.result()["git_hash"],
    ):
        yield


@contextlib.contextmanager
def no_environment() -> Iterator[None]:
    """Within the block, `simple_evaluate` reports no environment (for a count that writes no results)."""
    with _environment_hooks(lambda storage: None, lambda: None):
        yield
