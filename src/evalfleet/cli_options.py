"""lm-eval's own flags as `evalfleet run` and `submit` take them: its names (dashes for
underscores), its meanings, its parsers (`tasks/harness_args.py`)."""

from __future__ import annotations

import typer

APPLY_CHAT_TEMPLATE = typer.Option(None, "--apply-chat-template", metavar="[NAME]", help="Render prompts with the tokenizer's chat template; NAME picks one of several.")
FEWSHOT_AS_MULTITURN = typer.Option(None, "--fewshot-as-multiturn", metavar="[true|false]", help="Few-shot examples as chat turns (on with a chat template; 'false' turns it off).")
SYSTEM_INSTRUCTION = typer.Option(None, "--system-instruction", help="System prompt before every prompt.")
GEN_KWARGS = typer.Option(None, "--gen-kwargs", help="Generation settings over the tasks' own, key=value,... or JSON: until, max_gen_toks, do_sample, temperature, top_p, top_k, seed.")
SEED = typer.Option(None, "--seed", help="Seeds python,numpy,torch,fewshot (default 0,1234,1234,1234; 'None' leaves one unset); one number sets all four. torch's seeds sampling.")
MODEL_ARGS = typer.Option(None, "--model-args", help="lm-eval's model arguments, key=value,... or JSON: pretrained, revision, trust_remote_code, dtype, device, max_length, add_bos_token, enable_thinking, chat_template_args.")
PREDICT_ONLY = typer.Option(False, "--predict-only", help="Keep the generations (samples files), compute no metric.")
SAMPLES = typer.Option(None, "--samples", help="Document ids per task, JSON or a JSON file, e.g. '{\"demo_mc\": [0, 5]}' (instead of --limit).")
CONFIRM_UNSAFE = typer.Option(False, "--confirm-run-unsafe-code", help="Allow tasks that execute code the model writes.")
METADATA = typer.Option(None, "--metadata", help="lm-eval's task metadata, key=value,... or JSON (some tasks need it).")

# Options of every command that makes a job (run, submit, watch), with one meaning everywhere.
INCLUDE_PATH = typer.Option(None, "--include-path", help="Folder of extra lm-eval task YAML files.")
LIMIT = typer.Option(None, "--limit", help="Evaluate only the first N examples of each task.")
NUM_FEWSHOT = typer.Option(None, "--num-fewshot", help="Few-shot examples per prompt.")
PRIORITY = typer.Option("normal", "--priority", help="high | normal | low.")
DTYPE = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16.")

# lm-eval's spellings of the flags `run` and `submit` share with it, so its command lines work as typed.
LM_EVAL_SPELLINGS = {
    "--model_args": "--model-args", "--num_fewshot": "--num-fewshot", "--batch_size": "--batch-size",
    "--output_path": "--output", "--log_samples": "--log-samples", "--include_path": "--include-path",
    "--gen_kwargs": "--gen-kwargs", "--apply_chat_template": "--apply-chat-template",
    "--fewshot_as_multiturn": "--fewshot-as-multiturn", "--system_instruction": "--system-instruction",
    "--predict_only": "--predict-only", "--confirm_run_unsafe_code": "--confirm-run-unsafe-code",
}
# `--apply-chat-template` and `--fewshot-as-multiturn` may stand alone; typer's options always take
# a value, so a bare one is given lm-eval's meaning here: the tokenizer's template, on.
_BARE_VALUES = {"--apply-chat-template": "", "--fewshot-as-multiturn": "true"}


def lm_eval_command_line(args: list[str]) -> list[str]:
    """`evalfleet run|submit|watch` arguments with lm-eval's spellings and bare flags made typer's."""
    if not args or args[0] not in ("run", "submit", "watch"):
        return args
    spelled = []
    for arg in args:
        name, equals, value = arg.partition("=")
        spelled.append(LM_EVAL_SPELLINGS.get(name, name) + equals + value if name.startswith("--") else arg)
    return [
        f"{arg}={_BARE_VALUES[arg]}" if arg in _BARE_VALUES and (i + 1 == len(spelled) or spelled[i + 1].startswith("-")) else arg
        for i, arg in enumerate(spelled)
    ]
