"""The dashboard's lm-eval settings: the submit form's fields for lm-eval's flags.

They are typed as lm-eval's command line takes them (`key=value,...` or JSON for mappings) and
become `JobSubmission` fields, so the form, the API and `evalfleet submit` read them alike.
Document ids (`samples`) are read as JSON here, never as a file on the server.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from fastapi import Form

from evalfleet.types import UsageError

_TEXT = 4096


@dataclass
class LmEvalForm:
    num_fewshot: str = ""
    apply_chat_template: bool = False
    chat_template_name: str = ""
    fewshot_as_multiturn: str = ""
    system_instruction: str = ""
    gen_kwargs: str = ""
    seed: str = ""
    model_args: str = ""
    samples: str = ""
    predict_only: bool = False
    metadata: str = ""

    @classmethod
    def from_form(
        cls,
        num_fewshot: Annotated[str, Form(max_length=12)] = "",
        apply_chat_template: Annotated[bool, Form()] = False,
        chat_template_name: Annotated[str, Form(max_length=256)] = "",
        fewshot_as_multiturn: Annotated[str, Form(pattern="^(|true|false)$")] = "",
        system_instruction: Annotated[str, Form(max_length=_TEXT)] = "",
        gen_kwargs: Annotated[str, Form(max_length=_TEXT)] = "",
        seed: Annotated[str, Form(max_length=128)] = "",
        model_args: Annotated[str, Form(max_length=_TEXT)] = "",
        samples: Annotated[str, Form(max_length=_TEXT)] = "",
        predict_only: Annotated[bool, Form()] = False,
        metadata: Annotated[str, Form(max_length=_TEXT)] = "",
    ) -> LmEvalForm:
        return cls(num_fewshot, apply_chat_template, chat_template_name, fewshot_as_multiturn, system_instruction,
                   gen_kwargs, seed, model_args, samples, predict_only, metadata)

    def shown(self) -> dict[str, Any]:
        """The values to show again when the form comes back with an error."""
        return asdict(self)

    def submission_fields(self) -> dict[str, Any]:
        """`JobSubmission` fields; a template name turns the template on."""
        name = self.chat_template_name.strip()
        try:
            samples = json.loads(self.samples) if self.samples.strip() else None
        except ValueError:
            raise UsageError('samples: expected a JSON object of document id lists, such as {"demo_mc": [0, 3]}') from None
        return {
            "num_fewshot": self.num_fewshot.strip() or None,
            "apply_chat_template": name or self.apply_chat_template,
            "fewshot_as_multiturn": {"": None, "true": True, "false": False}[self.fewshot_as_multiturn],
            "system_instruction": self.system_instruction or None,
            "gen_kwargs": self.gen_kwargs.strip() or None,
            "seed": self.seed.strip() or None,
            "model_args": self.model_args.strip() or None,
            "samples": samples,
            "predict_only": self.predict_only,
            "metadata": self.metadata.strip() or None,
        }
