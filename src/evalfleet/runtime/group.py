"""What a worker group is, as both sides see it: its spec, its loading path, its exit codes.

The driver (`workers.py`, `transport.py`) checks and sends a `GroupSpec`; each rank
(`rank.py`, `parallel.py`) reads it back from its environment. Neither side imports the
other; both import this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from typing import Any

from evalfleet.types import EvalfleetError

# A rank that runs out of memory while loading exits with LOAD_OOM_EXIT, so the driver can
# ask the planner for a larger layout instead of retrying the same one.
LOAD_OOM_EXIT = 3
# A rank of a multi-rank group that runs out of memory during a batch exits with BATCH_OOM_EXIT:
# its peers may be waiting in a collective it will never join, so the group cannot agree on
# anything; the driver restarts it and retries with half the token budget.
BATCH_OOM_EXIT = 4

PATHS = {
    (False, False): "single",
    (True, False): "transformers-tp",
    (False, True): "transformers-pp",
    (True, True): "torch-hybrid",
}
DEVICE_MAP_PATH = "accelerate-device-map"
# transformers' tensor/pipeline-parallel internals (DistributedConfig(pp_size=...), _pp_stage,
# _device_mesh) are tested on this version; older ones serve the single-device and vLLM paths only.
TRANSFORMERS_FOR_SPLITS = (5, 24)


@dataclass(frozen=True)
class GroupSpec:
    """What every rank of a worker group needs to load its part of the model."""

    model_path: str
    dtype: str = "float32"
    device: str = "cpu"
    tp: int = 1
    pp: int = 1
    threads: int = 1
    max_length: int | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    time_communication: bool = True
    share_prefixes: bool = False
    # The vLLM backend: one process per replica, vLLM's own tp x pp beneath it (`vllm_worker`).
    backend: str = "hf"
    seed: int = 0
    gpu_memory_utilization: float | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    # A device_map replica: one process splits the layers over its pp devices (accelerate's
    # device_map), each device's weights within its bytes here ("0".."pp-1"; "cpu" and "disk" too).
    max_memory: dict[str, int] | None = None

    @property
    def world_size(self) -> int:
        """Devices per replica (its ranks, except where one process holds them all)."""
        return self.tp * self.pp

    @property
    def device_map(self) -> bool:
        return self.max_memory is not None

    @property
    def processes(self) -> int:
        """Processes the driver starts per replica: every rank, or one vLLM engine or device_map process."""
        return 1 if self.backend == "vllm" or self.device_map else self.world_size

    @property
    def path(self) -> str:
        """Which loading path (`parallel.py`'s docstring) this layout takes."""
        if self.backend == "vllm":
            return "vllm"
        return DEVICE_MAP_PATH if self.device_map else PATHS[(self.tp > 1, self.pp > 1)]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GroupSpec:
        return cls(**json.loads(text))

    def on_this_device(self) -> GroupSpec:
        """The spec with its device and dtype decided here, in the rank, where the weights will live.

        The driver sends what the request asked for (`auto` included): it may see other devices
        than its ranks (a Ray driver sees none), so `auto` becomes bfloat16 on a GPU that runs it,
        float16 on one that does not, float32 on the CPU, and a dtype the device cannot run is
        refused, by each rank for its own device. The ranks report what they loaded.
        """
        from evalfleet.runtime.backends.hf import resolve_device, resolve_dtype

        device = resolve_device(self.device)
        kind = "cuda" if device.startswith("cuda") else "cpu"
        return replace(self, device=kind, dtype=resolve_dtype(self.dtype, device))


def check_layout(spec: GroupSpec) -> None:
    """Refuse, in one sentence and before any process starts, a layout the model cannot take."""
    if spec.backend == "vllm":
        return  # vLLM splits every architecture it registers; the engine checked the declaration
    if spec.processes > 1:
        installed = version("transformers")
        if _release(installed) < TRANSFORMERS_FOR_SPLITS:
            raise EvalfleetError(
                f"the {spec.path} layout needs transformers {'.'.join(map(str, TRANSFORMERS_FOR_SPLITS))} or newer "
                f"and {installed} is installed; upgrade transformers or use --strategy dp"
            )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        spec.model_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    text = config.get_text_config()
    name = getattr(config, "model_type", "this model")
    if spec.device_map:
        _check_device_map(spec, config, text, name)
        return
    if spec.tp > 1:
        heads = getattr(text, "num_attention_heads", None)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        if not getattr(text, "base_model_tp_plan", None):
            raise EvalfleetError(f"{name} models have no tensor-parallel plan in transformers; use --strategy pp or dp")
        for what, count in (("attention heads", heads), ("key/value heads", kv_heads)):
            if count is None or count % spec.tp:
                raise EvalfleetError(f"tp={spec.tp} does not divide the model's {count} {what}; choose a tp that does")
    if spec.pp > 1:
        layers = getattr(text, "num_hidden_layers", 0)
        if layers < spec.pp:
            raise EvalfleetError(f"pp={spec.pp} is more stages than the model's {layers} layers")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
        base = getattr(model, model.base_model_prefix, None)
        if not all(hasattr(base, part) for part in ("embed_tokens", "layers", "norm")):
            raise EvalfleetError(
                f"pipeline parallelism needs a Llama-style model (embed_tokens, layers, norm); {name} is not one "
                "(--strategy device_map splits it by layers in one process)"
            )
    if spec.tp > 1 and spec.pp > 1:
        styles = set(getattr(text, "base_model_tp_plan", {}).values())
        if not styles <= set(torch_styles()):
            raise EvalfleetError(f"hybrid tp x pp cannot shard {name}'s tensor-parallel styles {sorted(styles)}")


def _check_device_map(spec: GroupSpec, config: Any, text: Any, name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    layers = getattr(text, "num_hidden_layers", 0)
    if spec.tp > 1 or not 1 < spec.pp <= layers:
        raise EvalfleetError(f"a device_map splits the model's {layers} layers over 2 to {layers} devices without "
                             f"tensor parallelism, not tp={spec.tp}, pp={spec.pp}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    if not getattr(model, "_no_split_modules", None):
        raise EvalfleetError(f"{name} models name no blocks to keep whole (_no_split_modules), which a device_map "
                             "needs; use --strategy dp or another layout")


def torch_styles() -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def _release(text: str) -> tuple[int, ...]:
    """The numeric release of a version string: "5.24.0.dev0" -> (5, 24, 0)."""
    from packaging.version import Version

    return Version(text).release
