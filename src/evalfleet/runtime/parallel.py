"""Rank side: loading this rank's part of one model over a worker group (tp x pp processes).

Which path each layout takes (checked on transformers 5.24, torch 2.13):

- tp = pp = 1 (a data-parallel replica): a plain `HFBackend`.
- tp > 1: transformers' distributed loading, `DistributedConfig(tp_size=tp)`; every rank reads
  only its shards and the model's own `base_model_tp_plan` adds the all-reduces.
- pp > 1: `DistributedConfig(pp_size=pp)`; every rank keeps only its stage's layers, and the
  hidden states go to the next stage by send/recv. Only Llama-style models (`embed_tokens`,
  `layers`, `norm`) can be split. Generation needs `StageCache` (below). transformers' own
  pp forward sends a whole batch through one stage after the other, so the other stages
  wait; log-likelihood batches instead go through `PipelinedHFBackend`, which splits each
  batch into micro-batches that flow through the stages under torch's GPipe schedule
  (forward only): stage 1 works on micro-batch k + 1 while stage 2 works on k.
- a device_map (`GroupSpec.max_memory` set): one process holds pp devices and the whole model,
  its layers spread over them by accelerate (`device_map.py`); no collectives.
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
from torch import nn
from transformers import DynamicCache

from evalfleet.planning.strategy import MICROBATCHES_PER_STAGE, microbatches
from evalfleet.runtime.backends.hf import HFBackend
from evalfleet.runtime.device_map import load_split
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


class _StageModule(nn.Module):
    """This rank's stage as a module torch's pipelining can drive: ids or hidden states in,
    hidden states (or, on the last stage, the last `keep` positions' logits) out."""

    def __init__(self, model: Any, first: bool, last: bool, keep: int) -> None:
        super().__init__()
        self.model, self.first, self.last, self.keep = model, first, last, keep

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        base = getattr(self.model, self.model.base_model_prefix)
        given = {"input_ids" if self.first else "inputs_embeds": inputs}
        hidden = base(**given, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
        return self.model.lm_head(hidden[:, -self.keep :, :]) if self.last else hidden


class PipelinedHFBackend(HFBackend):
    """A pipeline stage's backend whose log-likelihood batches go through the stages in
    micro-batches (torch's `ScheduleGPipe`, forward only; module docstring).

    Every rank builds the same padded batch (the driver sends it to all), so the attention
    mask and positions are given to every stage and split alongside the ids; only the hidden
    states travel. The last stage's logits are broadcast to the others, as transformers' own
    pp forward does, so the rest of `HFBackend` (scoring, the packed-mask check) runs as is.
    A batch with a reused prefix cache, or of one row, takes transformers' own pp forward.
    """

    microbatches_per_stage = MICROBATCHES_PER_STAGE
    given_cache = True
    first_layer = 0  # this stage's first layer (set at load)

    def new_cache(self) -> StageCache:
        return StageCache(self.first_layer, config=self.model.config)

    def _forward_last(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int, past: Any = None
    ) -> torch.Tensor:
        stage = self.model._pp_stage
        rows = ids.shape[0]
        size, count = microbatches(rows, stage.pp_size, self.microbatches_per_stage)
        if past is not None or count < 2:
            return super()._forward_last(ids, mask, positions, keep, past)
        extra = size * count - rows  # micro-batches must be alike: repeat the last row, drop its results
        if extra:
            ids, mask, positions = (torch.cat([t, t[-1:].expand(extra, *t.shape[1:])]) for t in (ids, mask, positions))
        logits = self._schedule(ids, keep, size, count).step(
            *((ids,) if stage.pp_is_first_stage else ()), attention_mask=mask, position_ids=positions
        )
        if logits is not None:
            logits = logits[:rows]
        return stage.broadcast_from_last(logits, dtype=self.model.dtype, device=self.device)

    def _schedule(self, ids: torch.Tensor, keep: int, size: int, count: int) -> Any:
        """A GPipe schedule for micro-batches of `size` rows (stages are fixed to one shape)."""
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        stage = self.model._pp_stage
        width, hidden = ids.shape[1], self.model.config.hidden_size
        dtype = self.model.dtype
        states = torch.empty((size, width, hidden), dtype=dtype, device="meta")
        inputs = torch.empty((size, width), dtype=torch.long, device="meta") if stage.pp_is_first_stage else states
        last = stage.pp_is_last_stage
        vocab = self.model.config.vocab_size
        outputs = torch.empty((size, keep, vocab), dtype=dtype, device="meta") if last else states
        module = _StageModule(self.model, stage.pp_is_first_stage, last, keep)
        pipeline_stage = PipelineStage(
            module, stage.pp_rank, stage.pp_size, self.device, input_args=inputs, output_args=outputs, group=stage.pp_group
        )
        return ScheduleGPipe(pipeline_stage, count)


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
    if spec.device_map:
        return LoadedPart(load_split(spec, device, common))
    if spec.path == "torch-hybrid":
        return _load_hybrid(spec, device, common)
    config = DistributedConfig(tp_size=spec.tp, pp_size=spec.pp)
    backend = (PipelinedHFBackend if spec.pp > 1 else HFBackend).load(spec.model_path, device=device, distributed_config=config, **common)
    model = backend.model
    if spec.pp > 1:
        stage = model._pp_stage
        backend.first_layer = stage.layer_range_for_rank(stage.pp_rank, model.config.num_hidden_layers)[0]
        _generate_with_stage_cache(model, backend.first_layer)
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
    backend = PipelinedHFBackend(model, whole.tokenizer, device, spec.max_length, spec.share_prefixes)
    tp_mesh = mesh["tp"]
    return LoadedPart(backend, tp_rank=tp_mesh.get_local_rank(), stage=stage.pp_rank, tp_group=tp_mesh.get_group())


def local_tensor(parameter: torch.Tensor) -> torch.Tensor:
    to_local = getattr(parameter, "to_local", None)
    return to_local() if callable(to_local) else parameter


def call_counts(backend: Any) -> tuple[int, int, int]:
    """The backend's counts so far: decode steps (continuous batching's), the rows they decoded, and
    out-of-memory halvings inside merged generation calls (runner.streamed)."""
    return (int(getattr(backend, "decode_steps", 0)), int(getattr(backend, "decoded_rows", 0)),
            int(getattr(backend, "stream_halvings", 0)))


def call_report(backend: Any, before: tuple[int, int, int]) -> dict[str, Any]:
    """What a rank tells the driver of one call, from `call_counts` taken before it."""
    steps, rows, halvings = (now - then for now, then in zip(call_counts(backend), before, strict=True))
    return {"decoded": [steps, rows], "oom_halvings": halvings}


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
    on_gpu = part.backend.device.type == "cuda"
    if on_gpu:
        memory = sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))  # a device_map's all
    else:
        import psutil

        memory = psutil.Process().memory_info().rss
    model = part.backend.model
    return {
        "rank": rank,
        "stage": part.stage,
        "tp_rank": part.tp_rank,
        # what this rank decided and loaded (GroupSpec.on_this_device): the driver records these
        "dtype": str(model.dtype).removeprefix("torch."),
        "device_name": torch.cuda.get_device_name() if on_gpu else "cpu",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        # a device_map's placement, module by module (accelerate's hf_device_map), else None
        "device_map": {name: str(where) for name, where in getattr(model, "hf_device_map", {}).items()} or None,
        # generation batches merged into one call are decoded as one stream (hf's continuous batching)
        "continuous": bool(getattr(part.backend, "continuous", False)),
        "parameters": parameters,
        "parameters_of_full_tensors": global_parameters,
        "parameter_bytes": nbytes,
        "memory_bytes": int(memory),
        "shapes": shapes,
    }


__all__ = ["PATHS", "GroupSpec", "LoadedPart", "PipelinedHFBackend", "StageCache", "call_counts", "call_report", "check_layout", "load_part", "local_tensor", "rank_report"]
