"""The single-device engine: one process, one model, cpu or one GPU.

It keeps the last model it loaded, so a second request on the same model skips the load.
"""

from __future__ import annotations

import asyncio
from typing import Any

from evalfleet.engines.base import EngineCapabilities, EvaluationEngine
from evalfleet.engines.evaluation import load_dtype_and_device, run_evaluation
from evalfleet.engines.capacity import device_memory_gb, estimate_model_size
from evalfleet.runtime.backends.hf import HFBackend
from evalfleet.runtime.lm import ProgressCallback
from evalfleet.runtime.runner import InProcessRunner
from evalfleet.runtime.threads import set_torch_threads
from evalfleet.types import DistributionStrategy, EvaluationRequest, EvaluationResult, resolve_model_path


class LightweightEvaluationEngine(EvaluationEngine):
    name = "lightweight"

    def __init__(self, progress: ProgressCallback | None = None) -> None:
        self.progress = progress
        self._loaded: tuple[tuple[Any, ...], HFBackend] | None = None

    def can_handle_request(self, request: EvaluationRequest) -> bool:
        if request.engine == "distributed" or request.backend == "vllm":
            return False
        if request.strategy not in (DistributionStrategy.AUTO, DistributionStrategy.SINGLE):
            return False
        if max(request.tp or 1, request.pp or 1, request.dp or 1) > 1:
            return False
        _, device = load_dtype_and_device(request)
        return estimate_model_size(request.model) <= device_memory_gb(device)

    def get_capabilities(self) -> EngineCapabilities:
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        return EngineCapabilities(
            name=self.name,
            strategies=[DistributionStrategy.SINGLE.value],
            devices=devices,
            backends=["hf"],
            max_model_gb=round(max(device_memory_gb(d) for d in devices), 2),
        )

    def optimize_memory(self) -> int:
        if self._loaded is None:
            return 0
        _, backend = self._loaded
        freed = backend.parameter_bytes()
        backend.close()
        self._loaded = None
        return int(freed)

    def _backend(self, request: EvaluationRequest, dtype: str, device: str) -> HFBackend:
        model = request.model
        key = (resolve_model_path(model.path), model.revision, dtype, device, model.max_length)
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        self.optimize_memory()
        if device == "cpu":
            set_torch_threads()
        backend = HFBackend.load(
            key[0],
            dtype=dtype,
            device=device,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            max_length=model.max_length,
            share_prefixes=True,
        )
        self._loaded = (key, backend)
        return backend

    def evaluate_sync(self, request: EvaluationRequest) -> EvaluationResult:
        dtype, device = load_dtype_and_device(request)
        backend = self._backend(request, dtype, device)
        return run_evaluation(
            request,
            InProcessRunner(backend, device),
            backend.tokenizer,
            engine=self.name,
            dtype=dtype,
            device=device,
            model_gb=round(backend.parameter_bytes() / 2**30, 6),
            progress=self.progress,
            monitor=self.monitor,
        )

    async def evaluate(self, request: EvaluationRequest) -> EvaluationResult:
        return await asyncio.to_thread(self.evaluate_sync, request)
