"""A tiny float32 Llama that vLLM's CPU kernels accept, and a task that samples."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinymodels import build_tiny_model

SAMPLING = """generation_kwargs:
  until:
    - "\\n"
  max_gen_toks: 12
  do_sample: true
  temperature: 1.5
  top_p: 0.95
"""


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory) -> Path:
    """Four heads of 32: vLLM's CPU attention needs a head size it has kernels for. 512 positions, so
    lm-eval's windows for transformers (max_length) and vLLM (max_length - 1) cut no text differently."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-vllm", family="llama-vllm", max_positions=512)


@pytest.fixture(scope="session")
def sampled_task(tmp_path_factory) -> Path:
    """demo_arith, sampled at a high temperature so the seed decides what comes out."""
    import re
    import shutil

    from tinymodels import DEMO_TASKS

    folder = tmp_path_factory.mktemp("sampled-task")
    for name in ("demo_arith.jsonl", "local_jsonl.py"):
        shutil.copy(DEMO_TASKS / name, folder / name)
    text = (DEMO_TASKS / "demo_arith.yaml").read_text().replace("task: demo_arith", "task: demo_arith_sampled")
    text = re.sub(r"generation_kwargs:\n(  .*\n)+", SAMPLING, text)
    assert "do_sample: true" in text
    (folder / "demo_arith_sampled.yaml").write_text(text)
    return folder
