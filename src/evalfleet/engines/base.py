"""The engine contract: what every evaluation engine offers, whatever runs underneath."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel, Field

from evalfleet.types import EvaluationRequest, EvaluationResult


class EngineCapabilities(BaseModel):
    """What an engine can do, for routing and for users who ask."""

    name: str
    strategies: list[str]
    devices: list[str]
    backends: list[str]
    max_model_gb: float = Field(description="largest model (weights, GB) it can place")
    extra: dict[str, Any] = Field(default_factory=dict)


class EvaluationEngine(ABC):
    """Evaluates one request end to end and returns lm-eval's results plus evalfleet's section."""

    name: str = "engine"
    # Called as progress(phase, done, total, tokens) while requests finish; set by the caller.
    progress: Any = None
    # A MultiGPUPerformanceMonitor watching the run, if any: engines feed it communication events.
    monitor: Any = None
    # Called with the runner once it is loaded and about to run (None once the run is over), by
    # engines whose runner can add and drop replicas while it runs; set by the caller.
    on_runner: Any = None

    @abstractmethod
    def can_handle_request(self, request: EvaluationRequest) -> bool:
        """Whether this engine can run the request on the hardware it was given."""

    @abstractmethod
    async def evaluate(self, request: EvaluationRequest) -> EvaluationResult:
        """Run the evaluation without blocking the event loop."""

    @abstractmethod
    def get_capabilities(self) -> EngineCapabilities:
        """Strategies, devices, backends and the largest model this engine can place."""

    @abstractmethod
    def optimize_memory(self) -> int:
        """Release what is idle (loaded models, caches); return the bytes freed."""
