"""The shipped table of what transformers can split is what the installed transformers says."""

from __future__ import annotations

import json

import pytest

from evalfleet.planning import backends


@pytest.fixture
def fresh_table():
    backends._hf_table.cache_clear()
    yield
    backends._hf_table.cache_clear()


def test_the_shipped_table_is_read_from_the_installed_transformers():
    """Makefile pins the transformers the table was read from; a new pin needs scripts/hf_capabilities.py."""
    shipped = json.loads(backends.HF_TABLE.read_text())
    assert shipped == backends.read_hf_table(tuple(shipped["families"]))


def test_the_table_answers_for_its_own_transformers_version(tmp_path, monkeypatch, fresh_table):
    table = tmp_path / "table.json"
    # A planted answer that transformers would contradict: opt has neither a tp plan nor Llama-style modules.
    table.write_text(json.dumps({"transformers": backends.version("hf"), "families": ["opt"],
                                 "tp_plan": ["opt"], "llama_style": ["opt"]}))
    monkeypatch.setattr(backends, "HF_TABLE", table)
    assert backends.layout_problem("hf", "opt", "OPTForCausalLM", 2, 2) is None


def test_another_transformers_version_is_asked_live(tmp_path, monkeypatch, fresh_table):
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"transformers": "0.0.1", "families": ["opt"], "tp_plan": ["opt"], "llama_style": ["opt"]}))
    monkeypatch.setattr(backends, "HF_TABLE", table)
    problem = backends.layout_problem("hf", "opt", "OPTForCausalLM", 2, 2)
    assert problem == ("transformers has no tensor-parallel plan for opt; "
                       "opt is not Llama-style (embed_tokens, layers, norm), which pipeline stages need")


def test_a_family_outside_the_table_is_asked_live(fresh_table):
    assert "gpt_bigcode" not in json.loads(backends.HF_TABLE.read_text())["families"]
    assert backends.layout_problem("hf", "gpt_bigcode", "GPTBigCodeForCausalLM", 1, 2) is not None
