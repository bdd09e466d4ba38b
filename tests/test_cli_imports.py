"""Commands import only what they use: `--help`, `plan` and `status` never load torch or lm-eval."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "lm_eval", "transformers", "datasets")
PROBE = """
import json, sys
from evalfleet import cli
sys.argv = ["evalfleet", *json.loads(sys.argv[1])]
try:
    cli.main()
except SystemExit:
    pass
print(json.dumps(sorted(name for name in {heavy} if name in sys.modules)), file=sys.stderr)
"""


def _heavy_modules_after(args: list[str], tmp_path) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(args)],
        capture_output=True, text=True, timeout=600, env={"EVALFLEET_DB": str(tmp_path / "jobs.sqlite"), "PATH": ""},
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [["--help"], ["plan", "--help"], ["plan", "--model", "meta-llama/Llama-2-7b-hf", "--gpus", "8xA100-80GB", "--json"],
     ["status", "--json"]],
)
def test_light_commands_import_neither_torch_nor_lm_eval(args, tmp_path):
    assert _heavy_modules_after(args, tmp_path) == []


def test_the_probe_sees_torch_when_a_command_needs_it(tmp_path):
    """The check can fail: `run` asks torch whether CUDA is there (and refuses, on this machine)."""
    assert "torch" in _heavy_modules_after(["run", "--model", "demo", "--device", "cuda", "--limit", "1"], tmp_path)
