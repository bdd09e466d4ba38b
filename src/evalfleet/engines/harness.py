"""lm-eval's command-line settings on a run: the checks that need the tasks, and their record.

Every setting that can change a score (chat template, system instruction, few-shot mode,
generation settings, seeds, model arguments, lm-eval's version) is written to results.json,
in the `evalfleet.settings` section and in lm-eval's own top-level fields (`chat_template_sha`,
`task_hashes`, …), so `compare` can say which of them two runs differ in.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from typing import Any

from evalfleet.tasks.noise import silence_third_party_noise
from evalfleet.types import EvaluationRequest, UsageError

SEED_NAMES = ("random", "numpy", "torch", "fewshot")
_UNSAFE = re.compile(r"run task: (\S+) which is marked as unsafe")


def simple_evaluate_arguments(request: EvaluationRequest) -> dict[str, Any]:
    """The request's lm-eval settings as `simple_evaluate` takes them, lm-eval's command line's way."""
    options = request.harness
    return {
        "system_instruction": options.system_instruction,
        "apply_chat_template": options.apply_chat_template,
        "fewshot_as_multiturn": options.multiturn,
        "gen_kwargs": options.gen_kwargs or None,
        "predict_only": options.predict_only,
        "samples": options.samples,
        "confirm_run_unsafe_code": options.confirm_run_unsafe_code,
        **dict(zip(("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"), request.seed)),
    }


def check_samples(request: EvaluationRequest, manager: Any) -> None:
    """`--samples` names tasks of this run and documents they have (lm-eval would fail an assertion).

    It loads the tasks once more, so only a run with `--samples` pays for it.
    """
    samples = request.harness.samples
    if not samples:
        return
    silence_third_party_noise()
    tasks = manager.load(list(request.tasks.names))["tasks"]
    for name, ids in samples.items():
        task = tasks.get(name)
        if task is None:
            raise UsageError(f"--samples names '{name}', which is not a task of this run ({', '.join(tasks)})")
        count = len(task.eval_docs)
        if ids[-1] >= count:
            raise UsageError(f"--samples: {name} has {count} documents (ids 0 to {count - 1}); {ids[-1]} is not one of them")


def refusal(error: BaseException) -> UsageError | None:
    """lm-eval's refusal of a task that runs generated code, as one sentence (None for other errors)."""
    match = _UNSAFE.search(str(error)) if isinstance(error, ValueError) else None
    if match is None:
        return None
    return UsageError(f"task '{match[1]}' runs code the model writes; add --confirm-run-unsafe-code to run it")


def lm_eval_fields(request: EvaluationRequest, lm: Any, samples: dict[str, list] | None) -> dict[str, Any]:
    """The top-level fields lm-eval's own results.json has for these settings (its tracker's)."""
    from lm_eval.utils import hash_string

    options = request.harness
    template = lm.chat_template(options.apply_chat_template) if options.apply_chat_template else None
    instruction = options.system_instruction
    return {
        "system_instruction": instruction,
        "system_instruction_sha": hash_string(instruction) if instruction else None,
        "fewshot_as_multiturn": options.multiturn,
        "chat_template": template,
        "chat_template_sha": hash_string(template) if template else None,
        "task_hashes": task_hashes(samples),
    }


def task_hashes(samples: dict[str, list] | None) -> dict[str, str]:
    """lm-eval's task hash: one hash over each sample's document, prompt and target hashes."""
    from lm_eval.utils import hash_string

    return {
        task: hash_string("".join(row["doc_hash"] + row["prompt_hash"] + row["target_hash"] for row in rows))
        for task, rows in (samples or {}).items()
    }


def score_settings(request: EvaluationRequest, lm: Any, fields: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Everything that can change a score, for results.json's `evalfleet.settings` (compared by `compare`)."""
    options = request.harness
    return {
        "lm_eval_version": version("lm_eval"),
        "model_args": {**request.model.model_dump(exclude={"path", "device"}), "dtype": dtype},
        "apply_chat_template": options.apply_chat_template,
        "chat_template_sha": fields["chat_template_sha"],
        "system_instruction_sha": fields["system_instruction_sha"],
        "fewshot_as_multiturn": options.multiturn,
        "num_fewshot": request.tasks.num_fewshot,
        "gen_kwargs": options.gen_kwargs,
        "seeds": dict(zip(SEED_NAMES, request.seed)),
        "sampling_seed": lm.seed,
        "samples": options.samples,
        "predict_only": options.predict_only,
        "metadata": options.metadata,
    }
