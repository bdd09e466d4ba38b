"""lm-eval's per-sample records, read for people: prompt, target, response, per-choice log-likelihoods."""

from __future__ import annotations

from typing import Any


def _value(item: Any) -> Any:
    """Logged responses are single-element lists (and numbers sometimes strings); unwrap them."""
    while isinstance(item, list) and len(item) == 1:
        item = item[0]
    return item


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _arguments(row: dict[str, Any]) -> list[list[Any]]:
    """Each request's arguments as a list: lm-eval logs a list of tuples (older versions a dict of gen_args_N)."""
    arguments = row.get("arguments") or []
    if isinstance(arguments, dict):
        arguments = [[args.get("arg_0"), args.get("arg_1")] for _, args in sorted(arguments.items())]
    return [list(args) if isinstance(args, (list, tuple)) else [args] for args in arguments]


def describe_sample(row: dict[str, Any]) -> dict[str, Any]:
    arguments = _arguments(row)
    responses = [_value(r) for r in row.get("resps") or []]
    scores = {name: row[name] for name in row.get("metrics") or [] if name in row}
    described: dict[str, Any] = {"doc_id": row.get("doc_id"), "prompt": arguments[0][0] if arguments else None,
                                 "target": row.get("target"), "filter": row.get("filter"), "scores": scores,
                                 "choices": [], "response": None}
    is_choice = all(len(args) > 1 and isinstance(args[1], str) for args in arguments)
    if arguments and is_choice and all(isinstance(r, list) and len(r) == 2 for r in responses):
        choices = [{"text": args[1], "loglikelihood": _number(resp[0]), "greedy": str(resp[1]).lower() == "true"}
                   for args, resp in zip(arguments, responses)]
        best = max(range(len(choices)), key=lambda i: choices[i]["loglikelihood"] or float("-inf"))
        for index, choice in enumerate(choices):
            choice["chosen"] = index == best
        described["choices"] = choices
        described["response"] = choices[best]["text"]
        target = row.get("target")
        if isinstance(target, int) and 0 <= target < len(choices):
            described["target"] = f"{target}: {choices[target]['text']}"
    elif responses:
        filtered = row.get("filtered_resps")
        described["response"] = _value(filtered) if filtered else responses[0]
    return described
