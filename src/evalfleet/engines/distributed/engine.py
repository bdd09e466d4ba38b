"""The distributed engine: lm-eval over worker groups (tensor, pipeline, hybrid or data parallel).

It shares the whole evaluation path with the lightweight engine (`run_evaluation`) and swaps
only the runner. Work runs in worker processes; `evaluate` awaits a thread that drives them,
so the event loop stays free, and cancelling it (Ctrl-C) stops the groups at once.

Worker groups started for one request are stopped when it ends. `preload(model)` keeps a
model's groups alive for the requests that follow, least recently used first out when a new
preload would pass the memory budget; `optimize_memory()` releases the idle ones.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from typing import Any

from evalfleet.engines.base import EngineCapabilities, EvaluationEngine
from evalfleet.engines.distributed.loader import DistributedModelInfo, MultiGPUModelLoader, WorkerLayout
from evalfleet.engines.evaluation import run_evaluation
from evalfleet.runtime.backends.hf import load_tokenizer, resolve_device
from evalfleet.runtime.group import DEVICE_MAP_PATH, PATHS
from evalfleet.runtime.lm import ProgressCallback
from evalfleet.runtime.workers import BATCH_TIMEOUT_S
from evalfleet.types import DistributionStrategy, EvalfleetError, EvaluationRequest, EvaluationResult, ModelConfig

_SPLIT = [
    DistributionStrategy.TENSOR_PARALLEL,
    DistributionStrategy.PIPELINE_PARALLEL,
    DistributionStrategy.HYBRID,
    DistributionStrategy.DATA_PARALLEL,
    DistributionStrategy.DEVICE_MAP,
]


class DistributedEvaluationCapabilities(EngineCapabilities):
    """What the distributed engine offers on this machine."""

    gpus: int = 0
    nodes: int = 1
    max_tp: int = 1
    max_pp: int = 1
    max_dp: int = 1
    parallel_paths: dict[str, str] = {}


def _hints(request: EvaluationRequest) -> dict[str, Any]:
    return {"strategy": request.strategy, "tp": request.tp, "pp": request.pp, "dp": request.dp}


def _backend(request: EvaluationRequest) -> str:
    """The request's backend once `evaluate_request` resolved `auto`; transformers when called directly."""
    return "hf" if request.backend == "auto" else request.backend


class _Loaded:
    """A model's worker groups, in use by `users` requests at the moment."""

    def __init__(self, info: DistributedModelInfo, pinned: bool) -> None:
        self.info = info
        self.pinned = pinned
        self.users = 0
        self.tokenizer: Any = None


class DistributedEvaluationEngine(EvaluationEngine):
    name = "distributed"

    def __init__(
        self,
        progress: ProgressCallback | None = None,
        *,
        inventory: Any = None,
        memory_budget_bytes: int | None = None,
        max_restarts: int = 2,
        batch_timeout: float = BATCH_TIMEOUT_S,
        env: dict[str, str] | None = None,
    ) -> None:
        self.progress = progress
        self.monitor: Any = None
        self.loader = MultiGPUModelLoader(
            inventory,
            max_restarts=max_restarts,
            batch_timeout=batch_timeout,
            on_communication=self._on_communication,
            on_step=self._on_step,
            on_engine_stats=self._on_engine_stats,
        )
        self.memory_budget_bytes = memory_budget_bytes
        self.env = dict(env or {})
        self._loaded: OrderedDict[tuple[Any, ...], _Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def _on_communication(self, kind: str, nbytes: int, seconds: float, devices: list[str]) -> None:
        if self.monitor is not None:
            self.monitor.record_communication_event(kind, nbytes, seconds, devices)

    def _on_step(self, seconds: float, stage: int, busy_seconds: float) -> None:
        if self.monitor is not None:
            self.monitor.record_step(seconds, stage=stage, busy_seconds=busy_seconds)

    def _watch_pids(self, pids: list[int]) -> None:
        if self.monitor is not None:
            for pid in pids:
                self.monitor.register_pid(pid)

    def _on_engine_stats(self, replica: str, stats: dict[str, float]) -> None:
        if self.monitor is not None:
            self.monitor.record_engine_stats(replica, stats)

    def layout_for(self, request: EvaluationRequest) -> WorkerLayout:
        """The layout to run, refused in one sentence when the backend cannot run it (the planner's declaration)."""
        from evalfleet.planning import backends, profile_model

        backend = _backend(request)
        layout = self.loader.determine_optimal_distribution_strategy(
            request.model, max_gpus=request.gpus or None, backend=backend, **_hints(request)
        )
        profile = profile_model(request.model.path)
        problem = backends.layout_problem(
            backend, profile.family, profile.architecture, layout.tp, layout.pp, layout.device_map
        )
        if problem:
            what = f"a device_map over {layout.pp} GPUs" if layout.device_map else f"tp={layout.tp}, pp={layout.pp}"
            raise EvalfleetError(f"cannot run {what}: {problem}")
        return layout

    def can_handle_request(self, request: EvaluationRequest) -> bool:
        """Whether a layout of this model fits here (the planner's answer on GPUs)."""
        if request.engine == "lightweight":
            return False
        try:
            self.layout_for(request)
        except EvalfleetError:
            return False
        return True

    def get_capabilities(self) -> DistributedEvaluationCapabilities:
        import torch

        from evalfleet.engines.capacity import device_memory_gb
        from evalfleet.planning import backends

        inventory = self.loader.inventory
        gpus = inventory.num_gpus
        largest_node = max((len(node.gpus) for node in inventory.nodes), default=1)
        if gpus:
            memory = sum(gpu.free_gb for node in inventory.nodes for gpu in node.gpus)
        else:
            memory = device_memory_gb("cpu")
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        cores = os.cpu_count() or 1
        return DistributedEvaluationCapabilities(
            name=self.name,
            strategies=[s.value for s in _SPLIT] + [DistributionStrategy.AUTO.value],
            devices=devices,
            backends=[name for name in backends.BACKENDS if backends.installed(name)],
            max_model_gb=round(memory, 2),
            gpus=gpus,
            nodes=len(inventory.nodes),
            max_tp=largest_node if gpus else cores,
            max_pp=gpus or cores,
            max_dp=gpus or cores,
            parallel_paths={
                "tp": PATHS[(True, False)],
                "pp": PATHS[(False, True)],
                "hybrid": PATHS[(True, True)],
                "dp": PATHS[(False, False)],
                "device_map": DEVICE_MAP_PATH,
            },
        )

    def _key(self, model: ModelConfig, layout: WorkerLayout, backend: str = "hf") -> tuple[Any, ...]:
        return (model.path, model.revision, model.dtype, resolve_device(model.device), model.max_length, layout, backend)

    def _acquire(
        self, model: ModelConfig, layout: WorkerLayout, pinned: bool, backend: str = "hf", seed: int = 0
    ) -> _Loaded:
        key = self._key(model, layout, backend)
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is not None:
                self._loaded.move_to_end(key)
                loaded.pinned |= pinned
                loaded.users += 1
                return loaded
        info = self.loader.load_model_distributed(
            model, layout, share_prefixes=True, env=self.env, backend=backend, seed=seed
        )
        loaded = _Loaded(info, pinned)
        loaded.tokenizer = load_tokenizer(info.model_path, model.revision, model.trust_remote_code)
        loaded.users = 1
        with self._lock:
            self._loaded[key] = loaded
            self._evict_beyond_budget()
        return loaded

    def _release(self, model: ModelConfig, layout: WorkerLayout, backend: str = "hf") -> None:
        key = self._key(model, layout, backend)
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is None:
                return
            loaded.users -= 1
            if loaded.users == 0 and not loaded.pinned:
                del self._loaded[key]
                loaded.info.runner.close()

    def _evict_beyond_budget(self) -> None:
        """Close idle groups, least recently used first, while the loaded weights pass the budget."""
        if self.memory_budget_bytes is None:
            return
        for key in list(self._loaded):
            total = sum(loaded.info.parameter_bytes for loaded in self._loaded.values())
            if total <= self.memory_budget_bytes:
                return
            if self._loaded[key].users == 0:
                self._loaded.pop(key).info.runner.close()

    def preload(
        self,
        model: ModelConfig | str,
        *,
        strategy: DistributionStrategy | str = DistributionStrategy.AUTO,
        tp: int | None = None,
        pp: int | None = None,
        dp: int | None = None,
    ) -> DistributedModelInfo:
        """Load `model` and keep its worker groups for later requests that ask for the same layout."""
        config = ModelConfig(path=model) if isinstance(model, str) else model
        layout = self.loader.determine_optimal_distribution_strategy(config, strategy=strategy, tp=tp, pp=pp, dp=dp)
        loaded = self._acquire(config, layout, pinned=True)
        with self._lock:
            loaded.users -= 1
        return loaded.info

    def loaded_models(self) -> list[DistributedModelInfo]:
        with self._lock:
            return [loaded.info for loaded in self._loaded.values()]

    def optimize_memory(self) -> int:
        """Stop every idle worker group; the bytes of weights they held."""
        freed = 0
        with self._lock:
            for key, loaded in list(self._loaded.items()):
                if loaded.users == 0:
                    freed += loaded.info.parameter_bytes
                    del self._loaded[key]
                    loaded.info.runner.close()
        self.loader.free_caches()
        return freed

    def shutdown(self) -> None:
        """Stop every worker group, busy or not."""
        with self._lock:
            loaded, self._loaded = list(self._loaded.values()), OrderedDict()
        for item in loaded:
            item.info.runner.close()

    def evaluate_sync(self, request: EvaluationRequest, cancel: _Cancel | None = None) -> EvaluationResult:
        layout = self.layout_for(request)
        backend = _backend(request)
        loaded = self._acquire(request.model, layout, pinned=False, backend=backend, seed=request.seed[2] or 0)
        info = loaded.info
        if cancel is not None and not cancel.watch(info.runner):
            self._release(request.model, layout, backend)
            raise EvalfleetError("the evaluation was cancelled")
        if self.monitor is not None:
            for pid in (pid for group in info.runner.worker_pids() for pid in group):
                self.monitor.register_pid(pid)
            info.runner.on_new_pids = self._watch_pids  # replicas that join while it runs
        if self.on_runner is not None:
            self.on_runner(info.runner)
        try:
            return run_evaluation(
                request,
                info.runner,
                loaded.tokenizer,
                engine=self.name,
                dtype=info.dtype,
                device=resolve_device(request.model.device),
                model_gb=round(sum(info.parameter_bytes_per_rank) / 2**30, 6),
                progress=self.progress,
                monitor=self.monitor,
                backend=backend,
                extra={
                    "distributed": {
                        "reason": layout.reason,
                        "max_length": info.max_length,
                        "memory_bytes_per_rank": info.memory_bytes_per_rank,
                    }
                },
            )
        finally:
            if self.on_runner is not None:
                self.on_runner(None)
            self._release(request.model, layout, backend)

    async def evaluate(self, request: EvaluationRequest) -> EvaluationResult:
        cancel = _Cancel()
        try:
            return await asyncio.to_thread(self.evaluate_sync, request, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the thread then fails fast instead of finishing the job
            raise


class _Cancel:
    """Stops the runner an evaluation thread uses once the awaiting task is cancelled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._runner: Any = None

    def watch(self, runner: Any) -> bool:
        """Remember `runner`; False if the evaluation was cancelled already."""
        with self._lock:
            self._runner = runner
            return not self._cancelled

    def set(self) -> None:
        with self._lock:
            self._cancelled = True
            runner = self._runner
        if runner is not None:
            runner.close(grace=0)
