"""Ranks decide their device and dtype where the weights live, never the driver.

This process (the driver) has no GPU. Its ranks get a fake one at the CUDA boundary
(`fake_cuda` in tests/faults/sitecustomize.py: torch.cuda reports a GPU of a given name, memory
and bf16 support, and nothing is allocated on it), so `auto` must come out as that GPU would
have it, and what the ranks loaded is what the driver records.
"""

from __future__ import annotations

import pytest
from faultenv import fault_env

from evalfleet.engines.distributed import MultiGPUModelLoader, WorkerLayout
from evalfleet.types import EvalfleetError, ModelConfig

H100 = "fake_cuda:NVIDIA H100 80GB HBM3:80:1"


def _load(llama, replicas: tuple[tuple[str, ...], ...], fault: str, dtype: str = "auto"):
    layout = WorkerLayout(tp=1, pp=1, dp=len(replicas), devices=replicas)
    return MultiGPUModelLoader().load_model_distributed(ModelConfig(path=str(llama), dtype=dtype), layout,
                                                        env=fault_env(fault))


@pytest.mark.parametrize(("device", "fault", "expected"), [
    ("cuda:0", H100, "bfloat16"),
    ("cpu", H100, "float32"),  # a CPU rank of a machine with GPUs sees none of them
])
def test_a_local_rank_decides_auto_for_its_own_device(llama, device, fault, expected):
    info = _load(llama, ((device,),), fault)
    try:
        assert info.dtype == expected
        assert info.runner.describe()["dtype"] == expected
        assert [rank["dtype"] for rank in info.runner.info["ranks"]] == [expected]
    finally:
        info.runner.close()


def test_replicas_that_decide_different_dtypes_are_refused(llama):
    with pytest.raises(EvalfleetError, match=r"different dtypes \(bfloat16, float32\).*pass --dtype"):
        info = _load(llama, (("cuda:0",), ("cpu",)), H100)
        info.runner.close()


def test_a_dtype_the_rank_cannot_run_is_refused_by_the_rank(llama):
    with pytest.raises(EvalfleetError, match="float16 is not supported on the CPU"):
        info = _load(llama, (("cpu",),), H100, dtype="float16")
        info.runner.close()
