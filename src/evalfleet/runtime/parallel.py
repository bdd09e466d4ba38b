"""One model over one worker group (tp x pp processes): how each layout is loaded.

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
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from evalfleet.runtime.backends.base import OutOfMemory
from evalfleet.runtime.backends.hf import HFBackend
from evalfleet.runtime.runner import compute
from evalfleet.runtime.transport import LOAD_OOM_EXIT, CommunicationTimer
from evalfleet.types import EvalfleetError

# Test-only fault injector, read in worker processes alone: `swap_tp_shards` gives every TP rank
# its neighbour's shard of one weight, `drop_pp_mask` hides the padding (attention mask and
# position ids) from the last pipeline stage, `oom_above:N` fails every batch of more than N
# padded tokens as out of memory, `oom_at_load` fails the load so. The distributed tests use
# them to show that their checks can fail and that the fault paths work.
TEST_FAULT_ENV = "EVALFLEET_TEST_FAULT"

COLLECTIVE_TIMEOUT = timedelta(minutes=30)
IDLE_TIMEOUT = timedelta(days=7)  # ranks other than 0 wait this long for the next message

PATHS = {
    (False, False): "single",
    (True, False): "transformers-tp",
    (False, True): "transformers-pp",
    (True, True): "torch-hybrid",
}


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

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def processes(self) -> int:
        """Processes the driver starts per replica: every rank, or one vLLM engine."""
        return 1 if self.backend == "vllm" else self.world_size

    @property
    def path(self) -> str:
        """Which loading path (module docstring) this layout takes."""
        return "vllm" if self.backend == "vllm" else PATHS[(self.tp > 1, self.pp > 1)]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GroupSpec:
        return cls(**json.loads(text))


def check_layout(spec: GroupSpec) -> None:
    """Refuse, in one sentence and before any process starts, a layout the model cannot take."""
    if spec.backend == "vllm":
        return  # vLLM splits every architecture it registers; the engine checked the declaration
    config = AutoConfig.from_pretrained(
        spec.model_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    text = config.get_text_config()
    name = getattr(config, "model_type", "this model")
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
                f"pipeline parallelism needs a Llama-style model (embed_tokens, layers, norm); {name} is not one"
            )
    if spec.tp > 1 and spec.pp > 1:
        styles = set(getattr(text, "base_model_tp_plan", {}).values())
        if not styles <= set(_torch_styles()):
            raise EvalfleetError(f"hybrid tp x pp cannot shard {name}'s tensor-parallel styles {sorted(styles)}")


def _torch_styles() -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


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
    styles = _torch_styles()
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


def active_test_fault() -> str:
    return os.environ.get(TEST_FAULT_ENV, "")


@torch.no_grad()
def inject_test_fault(part: LoadedPart, spec: GroupSpec) -> None:
    """Apply the test-only fault named in `EVALFLEET_TEST_FAULT` (see TEST_FAULT_ENV) to this rank."""
    fault = active_test_fault()
    model = part.backend.model
    if fault == "swap_tp_shards" and spec.tp > 1:
        local = next(
            local_tensor(p) for n, p in model.named_parameters() if "mlp" in n and local_tensor(p).shape != p.shape
        )
        shards = [torch.empty_like(local) for _ in range(spec.tp)]
        dist.all_gather(shards, local.contiguous(), group=part.tp_group)
        local.copy_(shards[(part.tp_rank + 1) % spec.tp])
    elif fault == "drop_pp_mask" and spec.pp > 1 and part.stage == spec.pp - 1:
        base = getattr(model, model.base_model_prefix)
        forward = base.forward

        def forward_without_mask(*args: Any, **kwargs: Any) -> Any:
            kwargs["attention_mask"] = kwargs["position_ids"] = None  # transformers rebuilds a mask from positions
            return forward(*args, **kwargs)

        base.forward = forward_without_mask


def compute_with_faults(backend: HFBackend, items: list[Any]) -> list[Any]:
    """`compute`, failing as out of memory above the `oom_above:N` test fault's token count."""
    fault = active_test_fault()
    if fault.startswith("oom_above:"):
        padded = len(items) * max(item.length for item in items)
        if padded > int(fault.split(":", 1)[1]):
            raise OutOfMemory(f"test fault: {padded} tokens")
    return compute(backend, items)


def _exit_with_parent() -> None:
    """A worker never outlives its driver, even one killed with SIGKILL."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="evalfleet-parent-watch", daemon=True).start()


def _join_group(spec: GroupSpec, rank: int, store_port: int) -> Any:
    """Join the replica's process group; return the gloo group that carries the driver's messages."""
    on_gpu = spec.device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(0)
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(
        "nccl" if on_gpu else "gloo",
        store=store,
        rank=rank,
        world_size=spec.world_size,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=torch.device("cuda", 0) if on_gpu else None,
    )
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


class _Control:
    """Rank 0 hears the driver and tells the others; the others only follow."""

    def __init__(self, rank: int, world_size: int, group: Any, conn: Connection | None) -> None:
        self.rank, self.world_size, self.group, self.conn = rank, world_size, group, conn

    def next_message(self) -> Any:
        message = [self.conn.recv() if self.rank == 0 else None]
        if self.world_size > 1:
            c10d.broadcast_object_list(message, src=0, group=self.group)
        return message[0]

    def gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        c10d.gather_object(value, gathered, dst=0, group=self.group)
        return gathered or []

    def agree(self, status: str) -> str:
        """The group's status for a batch: out of memory if any rank was."""
        if self.world_size == 1:
            return status
        flag = torch.tensor([int(status == "oom")])
        c10d.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return "oom" if flag.item() else "done"

    def reply(self, message: Any) -> None:
        if self.rank == 0:
            self.conn.send(message)


def serve(spec: GroupSpec, rank: int, store_port: int, conn: Connection | None) -> None:
    """A worker's life: join the group, load its part, then compute batches until told to stop."""
    torch.set_num_threads(spec.threads)
    _exit_with_parent()
    group = _join_group(spec, rank, store_port) if spec.world_size > 1 else None
    control = _Control(rank, spec.world_size, group, conn)
    started = time.perf_counter()
    try:
        if active_test_fault() == "oom_at_load":
            raise torch.OutOfMemoryError("test fault: out of memory at load")
        part = load_part(spec)
    except torch.OutOfMemoryError as error:
        print(f"out of memory while loading: {error}", file=sys.stderr, flush=True)
        os._exit(LOAD_OOM_EXIT)
    inject_test_fault(part, spec)
    on_gpu = part.backend.device.type == "cuda"
    timer = CommunicationTimer(torch.cuda.synchronize if on_gpu else None)
    if spec.time_communication and spec.world_size > 1:
        timer.install()
    report = rank_report(part, rank) | {"load_seconds": time.perf_counter() - started}
    reports = control.gather(report)
    control.reply(("ready", {"path": spec.path, "max_length": part.backend.max_length, "ranks": reports}))
    while (message := control.next_message())[0] == "batch":
        _, index, items = message
        began = time.perf_counter()
        status, results = "done", None
        try:
            results = compute_with_faults(part.backend, items)
        except OutOfMemory:
            status = "oom"
            if on_gpu:
                torch.cuda.empty_cache()
        status = control.agree(status)
        busy = time.perf_counter() - began
        reports = control.gather({"busy_seconds": busy, "events": timer.take()})
        control.reply((status, index, results if status == "done" else None, reports))
    if group is not None:
        dist.destroy_process_group()
