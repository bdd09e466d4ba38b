"""An lm-eval task whose dataset cannot be downloaded, told in one sentence with the way out.

lm-eval downloads a built-in task's dataset from the Hugging Face Hub when the task is
built; offline (no network, or `HF_DATASETS_OFFLINE=1`) that ends in a `ConnectionError`
from `datasets`, several exceptions deep. The user needs the dataset's name and the two
ways to provide it offline, not the traceback.
"""

from __future__ import annotations

import re

from evalfleet.types import EvalfleetError

_NAMES = (re.compile(r"Couldn't reach '([^']+)'"), re.compile(r"Dataset '?([^' ]+)'? is not cached"))
_OFFLINE_TYPES = {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError",
                  "ConnectTimeout", "ConnectTimeoutError", "NameResolutionError"}


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def unreachable_dataset(error: BaseException, tasks: list[str]) -> EvalfleetError | None:
    """The one-sentence error for a dataset that could not be downloaded, or None if `error` is another problem."""
    chain = _chain(error)
    if not any(type(e).__name__ in _OFFLINE_TYPES for e in chain):
        return None
    name = next((m.group(1) for e in chain for pattern in _NAMES if (m := pattern.search(str(e)))), None)
    if name is None:
        return None
    return EvalfleetError(
        f"the dataset '{name}' of task {', '.join(tasks)} cannot be downloaded (no network, or offline mode); "
        f"to run offline, fill the datasets cache (HF_DATASETS_CACHE) on a machine with network first, or give "
        f"the task a local dataset_path in a task YAML of your own (--include-path)"
    )
