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


def describe_sample(row: dict[str, Any]) -> dict[str, Any]:
    arguments = [args for _, args in sorted((row.get("arguments") or {}).items())]
    responses = [_value(r) for r in row.get("resps") or []]
    prompt = arguments[0].get("arg_0") if arguments else None
    scores = {name: row[name] for name in row.get("metrics") or [] if name in row}
    described: dict[str, Any] = {"doc_id": row.get("doc_id"), "prompt": prompt, "target": row.get("target"),
                                 "filter": row.get("filter"), "scores": scores, "choices": [], "response": None}
    continuation = arguments[0].get("arg_1") if arguments else None
    if isinstance(continuation, str) and all(isinstance(r, list) and len(r) == 2 for r in responses):
        choices = [{"text": args.get("arg_1"), "loglikelihood": _number(resp[0]),
                    "greedy": str(resp[1]).lower() == "true"} for args, resp in zip(arguments, responses)]
        best = max(range(len(choices)), key=lambda i: choices[i]["loglikelihood"] or float("-inf"), default=None)
        for index, choice in enumerate(choices):
            choice["chosen"] = index == best
        described["choices"] = choices
        described["response"] = choices[best]["text"] if best is not None else None
    elif responses:
        filtered = row.get("filtered_resps")
        described["response"] = _value(filtered) if filtered else responses[0]
    return described
