"""End to end: deterministic failures fail once, with their reason, and leave every device in the pool."""

from __future__ import annotations

import json
import shutil

import pytest
from fleet import fleet_in

from evalfleet.orchestrator import JobState

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path):
    with fleet_in(tmp_path, check_leftovers=False) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """GPT-2 has no tensor-parallel plan in transformers: `--tp 2` can never run."""
    import torch
    from tinymodels import train_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    tokenizer = train_tokenizer(folder)
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                  vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_a_layout_no_backend_can_run_is_refused_at_submit(fleet, tiny_gpt2):
    fleet.start("--gpus", "2xA10G-24GB", "--interval", "0.2")
    done = fleet.cli("submit", "--model", str(tiny_gpt2), "--tasks", "demo_mc", "--tp", "2", expect=1)
    assert done.stderr.count("\n") == 1 and "transformers has no tensor-parallel plan for gpt2" in done.stderr
    assert json.loads(fleet.cli("status", "--json").stdout) == []


def test_three_jobs_with_unreadable_weights_fail_once_each_and_quarantine_nothing(fleet, tiny_gpt2, tmp_path):
    # Three different models (copies), so blaming the devices for these failures would quarantine them.
    # The config is sound, so submit accepts them; the weights are cut short, which fails the same way anywhere.
    models = [shutil.copytree(tiny_gpt2, tmp_path / f"model-{n}") for n in range(3)]
    for model in models:
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    # A GPU pool on paper: the workers compute on the CPU, but the devices, placements and
    # quarantines are the ones a GPU node would have.
    fleet.start("--gpus", "2xA10G-24GB", "--interval", "0.2", "--backoff", "0", "--max-attempts", "3")
    jobs = [fleet.submit("--model", str(model), "--tasks", "demo_mc", "--limit", "2") for model in models]
    for job in jobs:
        record = fleet.wait_state(job, JobState.FAILED, timeout=180)
        assert record.attempts == 1, fleet.log.read_text()
        assert "could not load model" in record.error and "invalid header length" in record.error
        assert record.failure["failure"] == "deterministic"
        placed = [e for e in fleet.events(job) if e.to_state is JobState.PLACED]
        assert len(placed) == 1
        assert "a retry would fail the same way" in fleet.events(job)[-1].reason
    pool = json.loads(fleet.cli("pool", "--json").stdout)
    assert pool["quarantined"] == []
    assert all(gpu["quarantine"] is None and gpu["job"] is None for node in pool["nodes"] for gpu in node["gpus"])
