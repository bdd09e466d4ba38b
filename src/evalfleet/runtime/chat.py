"""Chat templates, rendered as lm-eval's `hf` backend renders them.

lm-eval builds each prompt as a list of chat turns (system, few-shot turns, the question) and
asks the model to render it (`TemplateLM.apply_chat_template`); `HFLM` calls the tokenizer's
own `apply_chat_template` and, when the template rejects a system turn, drops the system turns
and renders again. The same call here gives the same text, so the same `prompt_hash`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from evalfleet.types import UsageError

log = logging.getLogger("evalfleet")


def template_names(tokenizer: Any) -> list[str]:
    """The names `--apply-chat-template NAME` may take: the keys of a dict of templates, else `default`."""
    templates = getattr(tokenizer, "chat_template", None)
    if templates is None:
        return []
    return sorted(templates) if isinstance(templates, dict) else ["default"]


def select_template(tokenizer: Any, choice: bool | str, model: str) -> str:
    """The text of the template `choice` names (True: the tokenizer's own, as `HFLM` renders it),
    or one sentence saying there is none."""
    names = template_names(tokenizer)
    if not names:
        raise UsageError(f"the tokenizer of '{model}' has no chat template; run without --apply-chat-template")
    if choice is True:
        if "default" not in names:
            raise UsageError(f"the tokenizer of '{model}' has several chat templates and none named 'default'; "
                             f"name one with --apply-chat-template NAME ({', '.join(names)})")
        choice = "default"
    if choice not in names:
        raise UsageError(f"the tokenizer of '{model}' has no chat template named '{choice}' "
                         f"(it has: {', '.join(names)})")
    templates = tokenizer.chat_template
    return templates[choice] if isinstance(templates, dict) else templates


@functools.lru_cache(maxsize=8)
def _said_without_system(reason: str) -> None:
    """Once per reason, not once per prompt (lm-eval's `hf` repeats it for every one)."""
    log.warning("the chat template refused a conversation (%s); rendering without its system turn, as lm-eval does", reason)


def render_chat(tokenizer: Any, history: list[dict[str, str]], add_generation_prompt: bool,
                template: str, template_args: dict[str, Any]) -> str:
    """`HFLM.apply_chat_template`: the generation prompt, or the last (assistant) turn left open."""
    from jinja2.exceptions import TemplateError

    settings = {"tokenize": False, "add_generation_prompt": add_generation_prompt,
                "continue_final_message": not add_generation_prompt, "chat_template": template, **template_args}
    try:
        return tokenizer.apply_chat_template(history, **settings)
    except TemplateError as error:
        _said_without_system(str(error))
    try:
        return tokenizer.apply_chat_template([turn for turn in history if turn["role"] != "system"], **settings)
    except TemplateError as error:
        raise UsageError(f"the chat template cannot render this task's prompts: {error}") from None
