"""The GPU check's wheel list: what evalfleet and lm-eval need, less what the GPU machine has."""

from __future__ import annotations

import importlib.util

from clitools import REPO

spec = importlib.util.spec_from_file_location("gpu_missing", REPO / "scripts" / "gpu" / "missing.py")
missing_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(missing_module)


def _names(lines: list[str]) -> set[str]:
    return {line.split("==")[0] for line in lines}


def test_the_machine_gets_lm_eval_and_what_it_lacks_but_not_torch():
    present = missing_module.present(REPO / "scripts" / "gpu" / "present.txt")
    assert {"torch", "transformers", "huggingface-hub"} <= present
    wanted = _names(missing_module.missing(present))
    assert {"lm-eval", "datasets", "pydantic", "platformdirs"} <= wanted
    assert not wanted & present
    assert "evalfleet" not in wanted  # built from the tree by prepare.sh
    # huggingface-hub is there in its own version: its needs here (httpx2) are not brought
    assert "httpx2" not in wanted


def test_an_empty_machine_would_need_torch_too():
    wanted = _names(missing_module.missing(set()))
    assert {"torch", "transformers", "lm-eval"} <= wanted
