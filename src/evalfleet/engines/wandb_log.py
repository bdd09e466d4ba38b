"""A finished run logged to Weights & Biases by lm-eval's own `WandbLogger`, as `lm_eval --wandb_args` does.

Both `evalfleet run` and the scheduler's workers finish a run in `engines/run.py`, which calls this
once results.json (and the samples files) are on disk. As in lm-eval, a failure to log is reported
and does not fail the evaluation, whose results are already written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from evalfleet.types import UsageError

log = logging.getLogger(__name__)


def require_wandb() -> None:
    """A clear sentence before any work when `--wandb-args` is given and the package is missing."""
    try:
        import wandb  # noqa: F401
    except ModuleNotFoundError:
        raise UsageError("--wandb-args needs the package 'wandb'; install it with: pip install 'evalfleet[wandb]'") from None


def parse_wandb_args(text: str) -> dict[str, Any]:
    """`K=V,K=V` into wandb.init's arguments, with lm-eval's own parser (as its --wandb_args)."""
    from lm_eval.utils import simple_parse_args_string

    try:
        parsed = simple_parse_args_string(text)
    except ValueError as error:
        raise UsageError(f"--wandb-args: expected K=V,K=V ({error})") from None
    if not parsed:
        raise UsageError("--wandb-args: expected K=V,K=V, e.g. project=my-evals")
    return parsed


def log_to_wandb(init_args: dict[str, Any], document: dict[str, Any], samples_folder: Path | None) -> None:
    """Results (and, with a samples folder, the per-sample tables) to one W&B run, then finish it."""
    require_wandb()
    from lm_eval.loggers import WandbLogger

    try:
        logger = WandbLogger(init_args=dict(init_args))
    except Exception as error:  # noqa: BLE001  (as lm-eval: the results are written; only the upload failed)
        log.warning("logging to W&B failed: %s", error)
        return
    try:
        logger.post_init(document)
        logger.log_eval_result()
        if samples_folder is not None:
            samples = {}
            for task in document["results"]:
                path = samples_folder / f"samples_{task}.jsonl"
                if path.is_file():
                    samples[task] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            logger.log_eval_samples(samples)
    except Exception as error:  # noqa: BLE001
        log.warning("logging to W&B failed: %s", error)
    finally:
        logger.run.finish()
