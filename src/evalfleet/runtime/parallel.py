"""Rank side: loading this rank's part of one model over a worker group (tp x pp processes).

Which path each layout takes (checked on transformers 5.24, torch 2.13):

- tp = pp = 1 (a data-parallel replica): a plain `HFBackend`.
- tp > 1: transformers' distributed loading, `DistributedConfig(tp_size=tp)`; every rank reads
  only its shards and the model's own `base_model_tp_plan` adds the all-reduces.
- pp > 1: `DistributedConfig(pp_size=pp)`; every rank keeps only its stage's layers, and the
  hidden states go to the next stage by send/recv. Only Llama-style models (`embed_tokens`,
  `layers`, `norm`) can be split. Generation needs `StageCache` (below).
- tp > 1 and pp > 1: transformers 5.24 cannot combine them (it expands the TP plan before the
  stage split removes layers, then fails on the missing ones), so we load the whole model,
  split it with transformers' own `apply_pipeline_parallelism` over the pp sub-mesh, and shard
  each kept layer with torch's `parallelize_module` over the tp sub-mesh, taking the colwise /
  rowwise styles from the config's `base_model_tp_plan`.

Ranks are laid out pp-major (rank = stage * tp + tp_rank), as transformers' own mesh does.
`GroupSpec`, `PATHS` and `check_layout` live in `group.py` (both sides need them) and are
re-exported here for callers that load.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from evalfleet.runtime.backends.hf import HFBackend
from evalfleet.runtime.group import PATHS, GroupSpec, check_layout, torch_styles


class StageCache(DynamicCache):
    """A `DynamicCache` that measures its length on this stage's first layer.

    transformers asks layer 0 for the cached length; on a later pipeline stage layer 0 is not
    there and stays empty, so the decoding masks of left-padded rows come out wrong.
    """

    def __init__(self, first_layer: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.first_layer = first_layer

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(max(layer_idx, self.first_layer))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, max(layer_idx, self.first_layer))


def _generate_with_stage_cache(model: Any, first_layer: int) -> None:
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_cache", True) and kwargs.get("cache") is None:
            kwargs["cache"] = StageCache(first_layer, config=model.config)
        return original(*args, **kwargs)

    model.generate = generate


@dataclass
class LoadedPart:
    """This rank's part of the model, and where it sits in the group."""

    backend: HFBackend
    tp_rank: int = 0
    stage: int = 0
    tp_group: Any = None


def load_part(spec: GroupSpec) -> LoadedPart:
    """Load this rank's part of the model by the path its layout takes (module docstring)."""
    from transformers.distributed import DistributedConfig

    device = "cuda" if spec.device.startswith("cuda") else "cpu"
    common = {
        "dtype": spec.dtype,
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
        "max_length": spec.max_length,
        "share_prefixes": spec.share_prefixes,
    }
    if spec.path == "single":
        return LoadedPart(HFBackend.load(spec.model_path, device=device, **common))
    if spec.path == "torch-hybrid":
        return _load_hybrid(spec, device, common)
    config = DistributedConfig(tp_size=spec.tp, pp_size=spec.pp)
    backend = HFBackend.load(spec.model_path, device=device, distributed_config=config, **common)
    model = backend.model
    if spec.pp > 1:
        stage = model._pp_stage
        _generate_with_stage_cache(model, stage.layer_range_for_rank(stage.pp_rank, model.config.num_hidden_layers)[0])
        return LoadedPart(backend, stage=stage.pp_rank)
    mesh = model._device_mesh["tp"]
    return LoadedPart(backend, tp_rank=mesh.get_local_rank(), tp_group=mesh.get_group())


def _load_hybrid(spec: GroupSpec, device: str, common: dict[str, Any]) -> LoadedPart:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from transformers.distributed.pipeline_parallel import apply_pipeline_parallelism

    mesh = init_device_mesh(device, (spec.pp, spec.tp), mesh_dim_names=("pp", "tp"))
    whole = HFBackend.load(spec.model_path, device="cpu", **common)
    model = apply_pipeline_parallelism(whole.model, mesh["pp"])
    model.to(device)
    stage = model._pp_stage
    first, last = stage.layer_range_for_rank(stage.pp_rank, model.config.num_hidden_layers)
    styles = torch_styles()
    plan = {
        rule.split("*.", 1)[1]: styles[style]()
        for rule, style in model.config.get_text_config().base_model_tp_plan.items()
        if rule.startswith("layers.*.")
    }
    layers = getattr(model, model.base_model_prefix).layers
    for index in range(first, last):
        parallelize_module(layers[index], mesh["tp"], plan)
    _generate_with_stage_cache(model, first)
    backend = HFBackend(model, whole.tokenizer, device, spec.max_length, spec.share_prefixes)
    tp_mesh = mesh["tp"]
    return LoadedPart(backend, tp_rank=tp_mesh.get_local_rank(), stage=stage.pp_rank, tp_group=tp_mesh.get_group())


def local_tensor(parameter: torch.Tensor) -> torch.Tensor:
    to_local = getattr(parameter, "to_local", None)
    return to_local() if callable(to_local) else parameter


def rank_report(part: LoadedPart, rank: int) -> dict[str, Any]:
    """What this rank holds: parameters, bytes, local shapes and memory, for the driver."""
    shapes: dict[str, list[int]] = {}
    parameters = global_parameters = nbytes = 0
    for name, parameter in part.backend.model.named_parameters():
        local = local_tensor(parameter)
        shapes[name] = list(local.shape)
        parameters += local.numel()
        global_parameters += parameter.numel()
        nbytes += local.numel() * local.element_size()
    if part.backend.device.type == "cuda":
        memory = torch.cuda.memory_allocated()
    else:
        import psutil

        memory = psutil.Process().memory_info().rss
    return {
        "rank": rank,
        "stage": part.stage,
        "tp_rank": part.tp_rank,
        "parameters": parameters,
        "parameters_of_full_tensors": global_parameters,
        "parameter_bytes": nbytes,
        "memory_bytes": int(memory),
        "shapes": shapes,
    }


__all__ = ["PATHS", "GroupSpec", "LoadedPart", "StageCache", "check_layout", "load_part", "local_tensor", "rank_report"]
