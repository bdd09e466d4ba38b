"""What a job asks of the pool, in the terms the scheduling policy reasons with.

A `JobDemand` is the shape of one replica (tp x pp GPUs), how many data-parallel replicas
the job can use, how much work is left, and how fast k replicas do it. The throughput
per replica count comes from the planner's estimate for that exact layout, so a job's
runtime on g GPUs is the planner's figure, not a guess made here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

Device = tuple[int, int]
PRIORITY_RANK = {"low": 0, "normal": 1, "high": 2}


@dataclass(frozen=True)
class JobDemand:
    model: str
    work_tokens: float
    tokens_per_s: tuple[float, ...]
    """Estimated throughput with 1, 2, ... replicas; its length is the most replicas the job can use."""
    tp: int = 1
    pp: int = 1
    min_replicas: int = 1
    startup_s: float = 60.0
    """Seconds before the first token: process start, task building, weight loading from storage."""
    warm_startup_s: float = 20.0
    """The same when the node already holds the weights (page cache): model affinity pays off here."""
    need_gb: float = 0.0
    """Free memory each GPU of a replica needs (the planner's per-GPU total)."""
    avoid: tuple[Device, ...] = ()
    """Devices its last attempt failed on: placed elsewhere where the pool has room (see `recovery`)."""

    def __post_init__(self) -> None:
        if not self.tokens_per_s or any(t <= 0 for t in self.tokens_per_s):
            raise ValueError("tokens_per_s needs a positive throughput for each replica count")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is outside 1..{self.max_replicas}")
        if self.tp < 1 or self.pp < 1 or self.work_tokens < 0:
            raise ValueError("tp and pp must be at least 1 and work_tokens not negative")

    @property
    def max_replicas(self) -> int:
        return len(self.tokens_per_s)

    @property
    def replica_gpus(self) -> int:
        return self.tp * self.pp

    def runtime(self, replicas: int, *, warm: bool = False) -> float:
        startup = self.warm_startup_s if warm else self.startup_s
        return startup + self.work_tokens / self.tokens_per_s[replicas - 1]

    def gpu_seconds(self, replicas: int) -> float:
        return replicas * self.replica_gpus * self.runtime(replicas)

    def min_gpu_seconds(self) -> float:
        return min(self.gpu_seconds(k) for k in range(1, self.max_replicas + 1))

    def replicas_within(self, horizon_s: float) -> int:
        """The fewest replicas (from `min_replicas`) that finish within `horizon_s`, else the most."""
        for k in range(self.min_replicas, self.max_replicas + 1):
            if self.runtime(k) <= horizon_s:
                return k
        return self.max_replicas

    def with_work(self, work_tokens: float) -> JobDemand:
        return replace(self, work_tokens=max(0.0, work_tokens))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": list(self.tokens_per_s), "avoid": [list(d) for d in self.avoid]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobDemand:
        avoid = tuple(tuple(device) for device in data.get("avoid", ()))
        return cls(**{**data, "tokens_per_s": tuple(data["tokens_per_s"]), "avoid": avoid})


# Start-up costs for the runtime model: interpreter + lm-eval task building, then weights
# read at storage speed (cold) or from the node's page cache (warm), each GPU its own shard.
PROCESS_START_S = 45.0
COLD_READ_BYTES_PER_S = 1.5e9
WARM_READ_BYTES_PER_S = 12e9


def startup_seconds(weight_bytes: float, replica_gpus: int) -> tuple[float, float]:
    """(cold, warm) seconds from launch to the first batch for one replica's shard size."""
    shard = weight_bytes / replica_gpus
    return PROCESS_START_S + shard / COLD_READ_BYTES_PER_S, PROCESS_START_S + shard / WARM_READ_BYTES_PER_S


def estimate_work_tokens(task_count: int, limit: int | None, tokens_per_request: int = 512,
                         requests_per_task: int = 2000) -> float:
    """Tokens a request will compute before lm-eval has built its requests (refined by progress)."""
    return float(task_count * (limit or requests_per_task) * tokens_per_request)

