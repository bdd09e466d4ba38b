"""Rank side: one process holding a whole model split by layers over its devices (the `device_map` layout).

This is lm-eval's `parallelize=True`: accelerate's device_map, balanced over the devices as
transformers' `device_map="auto"` balances it, each device's weights within the limit the driver
sends (`GroupSpec.max_memory`, from the planner's memory model). Each layer runs on its device
and accelerate's hooks carry the hidden states from one device to the next, so one device
computes at a time; there are no collectives and no other ranks. It serves any causal LM whose
class names the blocks to keep whole (`_no_split_modules`), which is what families without a
tensor-parallel plan or Llama-style stages need.

The device map is worked out on the meta device before any weight is read, so a model the limits
cannot hold fails at once, as out of memory (the driver then tries a larger layout), instead of
spilling to the CPU or the disk. Limits for "cpu" and "disk" are taken as given (the weights on
the disk are read back for each forward from a temporary folder): that is how a test splits the
layers with no GPU.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from evalfleet.runtime.backends.hf import TORCH_DTYPES, HFBackend
from evalfleet.runtime.group import GroupSpec


def limits(spec: GroupSpec) -> dict[int | str, int]:
    """The spec's per-device limits as accelerate names devices: GPU indices as ints."""
    return {int(name) if name.isdigit() else name: int(size) for name, size in (spec.max_memory or {}).items()}


def layer_device_map(config: Any, budgets: dict[int | str, int], dtype: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """Which device holds each module: transformers' balanced split within `budgets` (bytes per device).

    Raises `torch.OutOfMemoryError` when the weights need a device the budgets do not name.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code)
    keep_whole = empty._no_split_modules
    balanced = get_balanced_memory(empty, max_memory=dict(budgets), no_split_module_classes=keep_whole)
    device_map = dict(infer_auto_device_map(empty, max_memory=balanced, no_split_module_classes=keep_whole))
    beyond = sorted({str(device) for device in device_map.values()} - {str(device) for device in budgets})
    if beyond:
        given = ", ".join(f"{device}: {size / 2**30:.2f} GB" for device, size in budgets.items())
        raise torch.OutOfMemoryError(f"the weights do not fit the device_map's limits ({given}); "
                                     f"they would spill to {', '.join(beyond)}")
    return device_map


def load_split(spec: GroupSpec, device: str, common: dict[str, Any]) -> HFBackend:
    """The whole model in this process, its layers on the devices of `spec.max_memory` (module docstring)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec.model_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    budgets = limits(spec)
    device_map = layer_device_map(config, budgets, spec.dtype, spec.trust_remote_code)
    offload = {"offload_folder": tempfile.mkdtemp(prefix="evalfleet-offload-")} if "disk" in budgets else {}
    return HFBackend.load(spec.model_path, device=device, device_map=device_map, **offload, **common)
