"""Third-party messages that are wrong or useless for an evalfleet run, kept off the terminal.

- lm-eval warns "Custom kwargs can be passed to `--metadata`" for every task with a
  `custom_dataset` hook (the demo tasks): a hint for lm-eval's own CLI, which evalfleet users
  do not run.
- lm-eval records the working folder's git commit by running `git describe`, whose
  "fatal: not a git repository" reaches the terminal outside a checkout. We ask git the same
  question with its stderr closed; results.json keeps the hash when there is one.
- transformers warns that a token sequence is longer than the model's maximum when a rolling
  log-likelihood tokenizes a whole document; evalfleet cuts such documents into windows
  itself, so the warning describes something that never happens.

Everything else from these libraries still gets through.
"""

from __future__ import annotations

import logging
import os
import subprocess

_DROPPED = {
    "lm_eval.api.task": "Custom kwargs can be passed to `--metadata`",
    "transformers.tokenization_utils_base": "Token indices sequence length is longer than the specified maximum",
}
_installed = False


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _quiet_git_commit_hash() -> str | None:
    """lm-eval's `get_git_commit_hash`, without git's complaint outside a checkout."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


def silence_third_party_noise() -> None:
    """Install the filters and the quiet git lookup (once per process)."""
    global _installed
    if _installed:
        return
    for name, text in _DROPPED.items():
        logging.getLogger(name).addFilter(_DropMessage(text))
    import lm_eval.evaluator

    lm_eval.evaluator.get_git_commit_hash = _quiet_git_commit_hash
    _installed = True
