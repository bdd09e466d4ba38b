"""An instruct-style tiny model (chat templates of its own) and few-shot tasks for lm-eval's flags.

The tokenizer carries two templates: `default`, which takes a system turn, and `strict`, which
rejects one (lm-eval's `hf` then renders again without it). The tasks have a training split for
few-shot examples, a generation prefix (the assistant turn left open) and a sampled task with
repeats.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tinymodels import build_tiny_model

DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
WORDS = "apple river stone light green quiet north table music winter seven garden".split()
TASKS = ["chat_pick", "chat_echo"]


def build_chat_model(folder: Path, templates: bool = True) -> Path:
    """A tiny Llama whose tokenizer has the two chat templates (or none)."""
    from transformers import AutoTokenizer

    build_tiny_model(folder, family="llama", seed=13, max_positions=1024)
    if templates:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.chat_template = {"default": DEFAULT_TEMPLATE, "strict": STRICT_TEMPLATE}
        tokenizer.save_pretrained(folder)
    return folder


def _rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [
        {"question": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))),
         "options": [" ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(3)],
         "gold": rng.randrange(3), "answer": rng.choice(WORDS)}
        for _ in range(n)
    ]


def build_chat_tasks(folder: Path) -> Path:
    """chat_pick (multiple choice), chat_fixed (the same with the same few-shot examples for every
    document, a shared prefix), chat_echo (generation after an open 'Answer:' turn), chat_sampled
    (sampled generation, three repeats per document)."""
    rng = random.Random(17)
    (folder / "train.jsonl").write_text("\n".join(map(json.dumps, _rows(rng, 8))))
    (folder / "test.jsonl").write_text("\n".join(map(json.dumps, _rows(rng, 10))))
    data = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {folder / 'train.jsonl'}\n"
            f"    test: {folder / 'test.jsonl'}\ntraining_split: train\ntest_split: test\nfewshot_split: train\n")
    pick = ("output_type: multiple_choice\ndescription: \"Pick the phrase that fits.\"\n"
            'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_choice: options\ndoc_to_target: gold\n'
            "metric_list:\n  - metric: acc\n")
    (folder / "chat_pick.yaml").write_text("task: chat_pick\n" + data + pick)
    (folder / "chat_fixed.yaml").write_text("task: chat_fixed\n" + data + pick + "fewshot_config:\n  sampler: first_n\n")
    generation = "generation_kwargs:\n  until: [\"\\n\", \"<|end|>\"]\n  max_gen_toks: 6\n"
    (folder / "chat_echo.yaml").write_text(
        "task: chat_echo\n" + data + "output_type: generate_until\n"
        'doc_to_text: "Say one word after: {{question}}"\ndoc_to_target: "{{answer}}"\ngen_prefix: "Answer:"\n'
        + generation + "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    (folder / "chat_sampled.yaml").write_text(
        "task: chat_sampled\n" + data + "output_type: generate_until\nrepeats: 3\n"
        'doc_to_text: "Say: {{question}}"\ndoc_to_target: "{{answer}}"\n'
        + generation + "  do_sample: true\n  temperature: 1.0\nmetric_list:\n  - metric: exact_match\n"
    )
    return folder


def lm_eval_hf(model: Path, tasks: list[str], folder: Path, model_args: dict[str, Any] | None = None,
               **flags: Any) -> dict[str, Any]:
    """lm-eval's own `hf` backend with lm-eval's flags (as `simple_evaluate` arguments), samples as JSON."""
    from lm_eval import simple_evaluate

    from evalfleet.engines.evaluation import BOOTSTRAP_ITERS
    from evalfleet.tasks import build_task_manager

    out = simple_evaluate(
        model="hf", model_args={"pretrained": str(model), "dtype": "float32", **(model_args or {})}, tasks=tasks,
        task_manager=build_task_manager(tasks, str(folder), flags.pop("metadata", None)), batch_size=4,
        device="cpu", log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS, **flags,
    )
    out["samples"] = {task: json.loads(json.dumps(rows, default=str)) for task, rows in out["samples"].items()}
    return out


def prompt_hashes(samples: dict[str, list[dict[str, Any]]]) -> dict[tuple[str, int], str]:
    return {(task, row["doc_id"]): row["prompt_hash"] for task, rows in samples.items() for row in rows}
