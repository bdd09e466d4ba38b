"""`MultiGPUPerformanceMonitor`: samples GPUs and host in the background while evalfleet works,
raises alerts, and explains afterwards what held the run back.

The sampler is one daemon thread. It measures its own CPU time (`sampler_cpu_seconds`) so the
cost of watching is itself a number, not a claim.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from evalfleet.monitoring.alerts import Alert, AlertBook, AlertThresholds
from evalfleet.monitoring.bottlenecks import BottleneckRules, Finding, find_bottlenecks
from evalfleet.monitoring.communication import CommunicationTracker
from evalfleet.monitoring.engine_stats import EngineStatsTracker
from evalfleet.monitoring.host import HostCollector
from evalfleet.monitoring.nvml import NvmlCollector
from evalfleet.monitoring.report import RunTotals, draw_chart, timeline
from evalfleet.monitoring.snapshot import MetricsSnapshot
from evalfleet.monitoring.store import SampleStore
from evalfleet.monitoring.suggestions import RunLayout, Suggestion, suggest
from evalfleet.types import UsageError, describe_validation_error

log = logging.getLogger(__name__)


def visible_devices(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The GPUs `CUDA_VISIBLE_DEVICES` names (indices or UUIDs, in CUDA's order); None when unset."""
    value = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


class MultiGPUPerformanceMonitor:
    """Watches the job's GPUs and evalfleet's own processes.

    The job's GPUs are `devices` (NVML indices or UUIDs), else those `CUDA_VISIBLE_DEVICES`
    names, else every GPU until the engine names its own through `set_layout(devices=...)`;
    a GPU another job uses must not count as idle or imbalanced here.
    `nvml` replaces the `pynvml` module (tests pass a fake); `on_alert` hears every alert
    that fires or clears. Use `start()`/`stop()` or `with monitor:`; a job counts as
    running (so idle GPUs raise the low-utilization alert) between them unless
    `start(job=False)`.
    """

    def __init__(
        self,
        interval: float = 1.0,
        history: int = 3600,
        db_path: str | Path | None = None,
        thresholds: AlertThresholds | None = None,
        nvml: ModuleType | Any | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        *,
        rules: BottleneckRules | None = None,
        children_refresh_s: float = 5.0,
        devices: Sequence[int | str] | None = None,
    ) -> None:
        if not interval > 0:
            raise UsageError("the monitoring interval must be a positive number of seconds")
        if history < 1:
            raise UsageError("the monitoring history must keep at least one sample")
        self.interval = float(interval)
        self.rules = rules or BottleneckRules()
        self.layout = RunLayout()
        self.job_running = False
        self.communication = CommunicationTracker()
        self.engine = EngineStatsTracker()
        self._on_alert = on_alert
        self.alerts = AlertBook(thresholds, self._alert_changed)
        self._store = SampleStore(db_path) if db_path is not None else None
        self._gpu = NvmlCollector(nvml)
        self._visible = visible_devices()
        self._gpu.restrict(devices if devices is not None else self._visible)
        self._host = HostCollector(children_refresh_s=children_refresh_s)
        self._history: deque[MetricsSnapshot] = deque(maxlen=history)
        self._totals = RunTotals()
        self._lock = threading.Lock()
        self._sample_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampler_cpu_s = 0.0
        self._sampler_wall_s = 0.0
        self._created_at = time.time()

    @property
    def nvml_status(self) -> str:
        return self._gpu.status

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def sampler_cpu_seconds(self) -> float:
        """CPU time the sampler thread has used (all runs of `start`), from `time.thread_time`."""
        return self._sampler_cpu_s

    @property
    def sampler_wall_seconds(self) -> float:
        return self._sampler_wall_s

    @property
    def history(self) -> list[MetricsSnapshot]:
        with self._lock:
            return list(self._history)

    def start(self, job: bool = True) -> MultiGPUPerformanceMonitor:
        if self.running:
            return self
        self.job_running = job
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="evalfleet-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.interval + 10.0)  # a hung NVML call must not hang the caller
        self.job_running = False

    def close(self) -> None:
        """Stop sampling and release NVML and the database; the history and summary stay readable."""
        self.stop()
        self._gpu.close()
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> MultiGPUPerformanceMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        cpu_start, wall_start = time.thread_time(), time.monotonic()
        cpu_before, wall_before = self._sampler_cpu_s, self._sampler_wall_s
        deadline = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # one bad reading must not end monitoring for the rest of the run
                log.exception("monitoring sample failed")
            self._sampler_cpu_s = cpu_before + time.thread_time() - cpu_start
            self._sampler_wall_s = wall_before + time.monotonic() - wall_start
            deadline = max(deadline + self.interval, time.monotonic())
            self._stop.wait(deadline - time.monotonic())
        self._sampler_cpu_s = cpu_before + time.thread_time() - cpu_start
        self._sampler_wall_s = wall_before + time.monotonic() - wall_start

    def sample(self) -> MetricsSnapshot:
        """Take one sample now, record it, and advance the alerts."""
        with self._sample_lock:
            gpus = self._gpu.collect()
            host = self._host.collect()
            snapshot = MetricsSnapshot(
                timestamp=time.time(),
                nvml=self._gpu.status,
                driver_version=self._gpu.driver_version,
                gpus=gpus,
                host=host,
                communication=self.communication.stats(),
                job_running=self.job_running,
            )
            with self._lock:
                self._history.append(snapshot)
                self._totals.add(snapshot)
            if self._store is not None:
                self._store.append(snapshot)
            self.alerts.evaluate(snapshot)
        return snapshot

    def _alert_changed(self, alert: Alert) -> None:
        if self._store is not None:
            self._store.append_alert(alert)
        if self._on_alert is not None:
            self._on_alert(alert)

    def get_current_metrics(self) -> MetricsSnapshot:
        """The sampler's latest snapshot while it runs; otherwise a fresh one."""
        if self.running:
            with self._lock:
                if self._history:
                    return self._history[-1]
        return self.sample()

    def record_communication_event(
        self, kind: str, bytes: int, seconds: float, devices: Sequence[int | str]  # noqa: A002 (the public name)
    ) -> None:
        """A collective or point-to-point transfer of `bytes` over `devices` that took `seconds`."""
        self.communication.record(kind, bytes, seconds, devices)

    def record_step(self, seconds: float, stage: int | None = None, busy_seconds: float | None = None) -> None:
        """A step's wall time, so communication can be expressed as a share of it (and stage bubbles found)."""
        self.communication.record_step(seconds, stage=stage, busy_seconds=busy_seconds)

    def record_engine_stats(self, replica: str, stats: dict[str, float]) -> None:
        """An inference engine's own totals so far (vLLM: requests, KV cache, queues, preemptions, tokens)."""
        self.engine.record(replica, stats)

    def register_pid(self, pid: int) -> None:
        self._host.register(pid)

    def unregister_pid(self, pid: int) -> None:
        self._host.unregister(pid)

    def set_layout(self, *, devices: Sequence[str] | None = None, **layout: Any) -> None:
        """Tell the monitor the run's tp/pp/dp and token budget, for concrete suggestions, and the
        devices the job computes on ("cuda:N" as the job numbers them, or "cpu"): only those are watched."""
        if devices is not None:
            gpus = [int(d.split(":", 1)[1]) if ":" in d else 0 for d in map(str, devices) if d.startswith("cuda")]
            visible = self._visible
            self._gpu.restrict([visible[i] if visible else i for i in gpus if not visible or i < len(visible)])
        try:
            self.layout = RunLayout.model_validate({**self.layout.model_dump(exclude_none=True), **layout})
        except ValidationError as error:
            raise UsageError(describe_validation_error(error)) from None

    def detect_bottlenecks(self, window: int | None = None) -> list[Finding]:
        """Findings over the last `window` samples (default: the whole in-memory history)."""
        samples = self.history
        if window is not None:
            samples = samples[-window:]
        found = find_bottlenecks(samples, self.communication.stats(), self.communication.stages(), self.rules)
        return found + self.engine.findings()

    def generate_optimization_suggestions(self, findings: list[Finding] | None = None) -> list[Suggestion]:
        layout = self.layout
        history = self.history
        if layout.nvlink is None and history and len(history[-1].gpus) > 1:
            layout = layout.model_copy(update={"nvlink": any(g.nvlink_active_links for g in history[-1].gpus)})
        return suggest(self.detect_bottlenecks() if findings is None else findings, layout)

    def summary(self) -> dict[str, Any]:
        """The `monitoring` section of results.json."""
        with self._lock:
            totals = self._totals.as_dict()
        findings = self.detect_bottlenecks()
        communication = self.communication.stats()
        return {
            "nvml": self._gpu.status,
            "driver_version": self._gpu.driver_version,
            "interval_s": self.interval,
            **totals,
            "communication_share": communication.share,
            "communication": communication.model_dump(mode="json"),
            "alerts_fired": [a.model_dump(mode="json") for a in self.alerts.all()],
            "alerts_active": len(self.alerts.active),
            "bottlenecks": [f.model_dump(mode="json") for f in findings],
            "suggestions": [s.model_dump(mode="json") for s in self.generate_optimization_suggestions(findings)],
            "sampler_cpu_seconds": round(self._sampler_cpu_s, 4),
            "engine": self.engine.summary(),
        }

    def write_report(self, directory: str | Path, png: bool = True) -> list[Path]:
        """Write `monitoring.json` (summary and timeline) and, with `png`, `monitoring.png`."""
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create the report folder {directory}: {error.strerror}") from None
        samples = self._store.samples(since=self._created_at) if self._store is not None else self.history
        series = timeline(samples)
        document = {"summary": self.summary(), "timeline": series}
        written = [directory / "monitoring.json"]
        written[0].write_text(json.dumps(document, indent=2) + "\n")
        if png:
            written.append(directory / "monitoring.png")
            title = f"evalfleet monitoring ({len(samples)} samples, NVML {self._gpu.status})"
            draw_chart(series, written[1], title=title)
        return written
