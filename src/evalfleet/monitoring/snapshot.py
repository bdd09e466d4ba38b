"""What one sample of the machine looks like: typed, JSON-ready, and honest about gaps.

A number NVML or psutil could not give is `None` (and, for GPUs, named in `unsupported` or
`errors`), never a guessed zero: a zero utilization must mean an idle GPU.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

ProcessRole = Literal["self", "child", "registered"]


class GPUMetrics(BaseModel):
    """One GPU as NVML reported it at `MetricsSnapshot.timestamp`."""

    index: int
    uuid: str | None = None
    name: str | None = None
    utilization_percent: float | None = None
    memory_copy_utilization_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: int | None = None
    sm_clock_max_mhz: int | None = None
    throttle_mask: int | None = None
    throttle_reasons: list[str] = Field(default_factory=list)
    pcie_tx_bytes_per_s: float | None = None
    pcie_rx_bytes_per_s: float | None = None
    nvlink_active_links: int | None = None
    nvlink_tx_bytes_per_s: float | None = None
    nvlink_rx_bytes_per_s: float | None = None
    xid_errors: int | None = Field(default=None, description="XID errors seen since the monitor started")
    last_xid: int | None = None
    ecc_corrected: int | None = None
    ecc_uncorrected: int | None = None
    unsupported: list[str] = Field(default_factory=list, description="fields this GPU does not support")
    errors: dict[str, str] = Field(default_factory=dict, description="fields NVML failed to read")

    @property
    def memory_percent(self) -> float | None:
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return 100.0 * self.memory_used_bytes / self.memory_total_bytes

    @property
    def power_percent(self) -> float | None:
        if self.power_w is None or not self.power_limit_w:
            return None
        return 100.0 * self.power_w / self.power_limit_w


class ProcessMetrics(BaseModel):
    """One of evalfleet's own processes: this one, its children, or a registered worker."""

    pid: int
    name: str
    role: ProcessRole
    rss_bytes: int
    cpu_percent: float | None = Field(
        description="percent of one core (above 100 means several cores); None on a process's first reading"
    )


class HostMetrics(BaseModel):
    cpu_percent: float
    per_cpu_percent: list[float]
    cpu_count: int
    memory_used_bytes: int
    memory_total_bytes: int
    memory_percent: float
    processes: list[ProcessMetrics] = Field(default_factory=list)

    @property
    def workers_rss_bytes(self) -> int:
        return sum(p.rss_bytes for p in self.processes)

    @property
    def workers_cpu_percent(self) -> float:
        return sum(p.cpu_percent or 0.0 for p in self.processes)


class LinkStats(BaseModel):
    """Traffic over one group of devices, as reported by `record_communication_event`."""

    link: str
    kinds: list[str]
    events: int
    bytes: int
    seconds: float
    bandwidth_bytes_per_s: float | None = Field(description="bytes / seconds (algorithm bandwidth)")
    bus_bandwidth_bytes_per_s: float | None = Field(
        description="algorithm bandwidth scaled by the collective's traffic factor (nccl-tests' busbw)"
    )


class CommunicationStats(BaseModel):
    events: int = 0
    bytes: int = 0
    seconds: float = 0.0
    steps: int = 0
    step_seconds: float = 0.0
    share: float | None = Field(default=None, description="communication seconds / step seconds, whole run")
    recent_share: float | None = Field(default=None, description="the same over the recent window")
    links: list[LinkStats] = Field(default_factory=list)


class StageStats(BaseModel):
    """Time a pipeline stage spent working versus waiting, from `record_step(..., stage, busy_seconds)`."""

    stage: int
    steps: int
    seconds: float
    busy_seconds: float

    @property
    def idle_fraction(self) -> float:
        return max(0.0, 1.0 - self.busy_seconds / self.seconds) if self.seconds > 0 else 0.0


class MetricsSnapshot(BaseModel):
    timestamp: float = Field(description="seconds since the epoch")
    nvml: str = Field(description="'available', or 'unavailable: <reason>'")
    driver_version: str | None = None
    gpus: list[GPUMetrics] = Field(default_factory=list)
    host: HostMetrics
    communication: CommunicationStats = Field(default_factory=CommunicationStats)
    job_running: bool = False
