"""lm-eval's command-line values, read by lm-eval's own parsers, as `EvaluationRequest` fields.

`evalfleet run`, `submit` and the HTTP API take the flags lm-eval's users already write
(`--gen-kwargs temperature=0.8,until=["\\n"]`, `--seed 0,1234,1234,1234`, `--model-args
revision=main,dtype=float32`, `--samples '{"task": [0, 3]}'`); this module turns them into the
request's `harness`, `seed` and `model` fields, or one sentence naming the flag that is wrong.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

from evalfleet.types import DEFAULT_SEEDS, Device, Dtype, UsageError, resolve_model_path

# lm-eval hf's model arguments that evalfleet applies, and the `ModelConfig` field each one sets.
MODEL_ARGS = {"pretrained": None, "revision": "revision", "trust_remote_code": "trust_remote_code",
              "dtype": "dtype", "device": "device", "max_length": "max_length", "add_bos_token": "add_bos_token",
              "enable_thinking": "chat_template_args", "chat_template_args": "chat_template_args"}


def parse_mapping(flag: str, value: str | dict[str, Any] | None) -> dict[str, Any]:
    """A `key=value,key=value` string or a JSON object, read as lm-eval's command line reads it."""
    if isinstance(value, dict):
        return value
    if value is None or not value.strip():
        return {}
    from lm_eval._cli.utils import key_val_to_dict, try_parse_json

    try:
        parsed = try_parse_json(value)
        return parsed if isinstance(parsed, dict) else key_val_to_dict(value)
    except ValueError as error:
        raise UsageError(f"{flag}: {error}") from None


def parse_seeds(value: str | int | list[Any] | None) -> Any:
    """`--seed`: one number for all four seeds, or python,numpy,torch[,fewshot] with 'None' to leave one unset."""
    if value is None:
        return DEFAULT_SEEDS
    if not isinstance(value, str):
        return value
    from lm_eval._cli.utils import _int_or_none_list_arg_type

    defaults = ",".join(map(str, DEFAULT_SEEDS))
    try:
        return _int_or_none_list_arg_type(3, 4, defaults, value)
    except ValueError as error:
        raise UsageError(f"--seed: {error}") from None


def parse_samples(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """`--samples`: a JSON object of document ids per task, or a JSON file holding one (as lm-eval takes it)."""
    if value is None or isinstance(value, dict):
        return value
    text = value
    if not value.lstrip().startswith("{") and Path(value).expanduser().is_file():
        text = Path(value).expanduser().read_text()
    try:
        parsed = json.loads(text)
    except ValueError:
        raise UsageError(f"--samples: '{value[:80]}' is neither a JSON object nor a JSON file") from None
    if not isinstance(parsed, dict) or not all(
        isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids) for ids in parsed.values()
    ):
        raise UsageError('--samples: expected a JSON object of document id lists, such as {"task": [0, 3]}')
    return parsed


def _same_model(named: str, model: str) -> bool:
    a, b = Path(resolve_model_path(named)).expanduser(), Path(resolve_model_path(model)).expanduser()
    return a.resolve() == b.resolve() if a.exists() and b.exists() else str(a) == str(b)


def model_fields(model_args: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` fields `model`, with `--model-args` applied; a flag given both ways must agree.

    The model may be named by `pretrained` alone, as on lm-eval's command line.
    """
    fields = dict(model)
    if fields.get("path") is None:
        if "pretrained" not in model_args:
            raise UsageError("name the model with --model PATH (or --model-args pretrained=PATH)")
        fields["path"] = str(model_args["pretrained"])
    choices = {"dtype": typing.get_args(Dtype), "device": typing.get_args(Device)}
    for name, value in model_args.items():
        if name not in MODEL_ARGS:
            raise UsageError(f"--model-args: evalfleet does not apply '{name}' (it takes {', '.join(MODEL_ARGS)})")
        if name == "pretrained":
            if not _same_model(str(value), fields["path"]):
                raise UsageError(f"--model-args: pretrained={value} names another model than --model {fields['path']}")
            continue
        if name in choices:
            if value not in choices[name]:
                raise UsageError(f"--model-args: {name}={value} is not one of {', '.join(choices[name])}")
            if fields.get(name, "auto") not in ("auto", value):
                raise UsageError(f"--model-args: {name}={value} disagrees with --{name} {fields[name]}")
        if name == "enable_thinking":
            fields["chat_template_args"] = {**fields.get("chat_template_args", {}), "enable_thinking": value}
        elif name == "chat_template_args":
            if not isinstance(value, dict):
                raise UsageError("--model-args: chat_template_args must be a mapping, such as {'enable_thinking': False}")
            fields["chat_template_args"] = {**value, **fields.get("chat_template_args", {})}
        else:
            fields[MODEL_ARGS[name]] = value
    return fields


def chat_template_choice(value: str | bool | None) -> str | bool:
    """`--apply-chat-template` alone (an empty value) means the tokenizer's template; a value names one."""
    if value is None or value is False:
        return False
    return True if value in ("", True) else value


def flag_bool(value: str | bool | None) -> bool | None:
    """lm-eval's reading of `--fewshot-as-multiturn [true|false]`."""
    if value is None or isinstance(value, bool):
        return value
    return value.lower() in ("true", "1", "yes")


def request_fields(*, model: dict[str, Any], model_args: str | dict[str, Any] | None = None,
                   apply_chat_template: str | bool | None = None, fewshot_as_multiturn: str | bool | None = None,
                   system_instruction: str | None = None, gen_kwargs: str | dict[str, Any] | None = None,
                   seed: str | int | list[Any] | None = None, predict_only: bool = False,
                   samples: str | dict[str, Any] | None = None, confirm_run_unsafe_code: bool = False,
                   metadata: str | dict[str, Any] | None = None) -> dict[str, Any]:
    """`model`, `harness` and `seed` of an `EvaluationRequest` from lm-eval's flags.

    The model arguments are merged into the tasks' metadata, as lm-eval's command line does.
    """
    arguments = parse_mapping("--model-args", model_args)
    return {
        "model": model_fields(arguments, model),
        "harness": {
            "apply_chat_template": chat_template_choice(apply_chat_template),
            "fewshot_as_multiturn": flag_bool(fewshot_as_multiturn),
            "system_instruction": system_instruction,
            "gen_kwargs": parse_mapping("--gen-kwargs", gen_kwargs),
            "predict_only": predict_only,
            "samples": parse_samples(samples),
            "confirm_run_unsafe_code": confirm_run_unsafe_code,
            "metadata": arguments | parse_mapping("--metadata", metadata),
        },
        "seed": parse_seeds(seed),
    }
