"""Rules that read a window of samples and say what holds a run back, with the numbers that show it.

Each rule is a plain function of the samples (and of what the engine reported about its
steps and collectives), so the rules are tested on synthetic streams without any GPU.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from statistics import fmean
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from evalfleet.monitoring.alerts import Severity
from evalfleet.monitoring.nvml import POWER_REASONS, THERMAL_REASONS
from evalfleet.monitoring.snapshot import CommunicationStats, GPUMetrics, MetricsSnapshot, StageStats

FindingKind = Literal[
    "communication_bound",
    "near_oom",
    "gpu_imbalance",
    "pipeline_bubble",
    "host_bound",
    "thermal_throttling",
    "power_throttling",
    "kv_cache_preemption",
]
_RANK = {"critical": 0, "warning": 1, "info": 2}


class Finding(BaseModel):
    kind: FindingKind
    severity: Severity
    summary: str
    subjects: list[str] = Field(default_factory=list, description="'gpu<N>', 'host', 'stage<N>' or 'run'")
    evidence: dict[str, Any] = Field(default_factory=dict)


class BottleneckRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_samples: int = Field(default=3, ge=1)
    communication_share: float = 0.10
    communication_critical_share: float = 0.30
    near_oom_percent: float = 90.0
    near_oom_critical_percent: float = 97.0
    imbalance_spread_percent: float = 30.0
    imbalance_critical_spread_percent: float = 60.0
    imbalance_min_busy_percent: float = 50.0
    bubble_idle_fraction: float = 0.25
    bubble_critical_idle_fraction: float = 0.50
    host_bound_gpu_percent: float = 40.0
    host_bound_cpu_percent: float = 90.0
    host_bound_process_percent: float = 90.0
    throttle_fraction: float = 0.20


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return fmean(known) if known else None


def _per_gpu(samples: Sequence[MetricsSnapshot]) -> dict[int, list[GPUMetrics]]:
    series: dict[int, list[GPUMetrics]] = defaultdict(list)
    for sample in samples:
        for gpu in sample.gpus:
            series[gpu.index].append(gpu)
    return dict(sorted(series.items()))


def _communication(stats: CommunicationStats, rules: BottleneckRules) -> list[Finding]:
    share = stats.share
    if share is None or share < rules.communication_share:
        return []
    severity: Severity = "critical" if share >= rules.communication_critical_share else "warning"
    slowest = min(stats.links, key=lambda link: link.bus_bandwidth_bytes_per_s or float("inf"), default=None)
    return [Finding(
        kind="communication_bound", severity=severity, subjects=["run"],
        summary=f"communication takes {share:.0%} of step time ({stats.seconds:.2f} s of {stats.step_seconds:.2f} s)",
        evidence={
            "share": round(share, 4),
            "communication_seconds": stats.seconds,
            "step_seconds": stats.step_seconds,
            "bytes": stats.bytes,
            "slowest_link": slowest.link if slowest else None,
            "slowest_link_bus_bandwidth_gb_per_s": round((slowest.bus_bandwidth_bytes_per_s or 0) / 1e9, 3)
            if slowest else None,
        },
    )]


def _near_oom(samples: Sequence[MetricsSnapshot], rules: BottleneckRules) -> list[Finding]:
    peaks: dict[str, tuple[float, int | None, int | None]] = {}
    for index, series in _per_gpu(samples).items():
        known = [(g.memory_percent, g) for g in series if g.memory_percent is not None]
        if not known:
            continue
        percent, worst = max(known, key=lambda pair: pair[0])
        if percent >= rules.near_oom_percent:
            peaks[f"gpu{index}"] = (percent, worst.memory_used_bytes, worst.memory_total_bytes)
    host = max(samples, key=lambda s: s.host.memory_percent).host
    if host.memory_percent >= rules.near_oom_percent:
        peaks["host"] = (host.memory_percent, host.memory_used_bytes, host.memory_total_bytes)
    if not peaks:
        return []
    top = max(p[0] for p in peaks.values())
    return [Finding(
        kind="near_oom", severity="critical" if top >= rules.near_oom_critical_percent else "warning",
        subjects=list(peaks),
        summary="memory peaked at " + ", ".join(f"{p[0]:.1f}% on {s}" for s, p in peaks.items()),
        evidence={
            s: {"peak_percent": round(p[0], 2), "used_bytes": p[1], "total_bytes": p[2]} for s, p in peaks.items()
        },
    )]


def _imbalance(samples: Sequence[MetricsSnapshot], rules: BottleneckRules) -> list[Finding]:
    means = {i: m for i, s in _per_gpu(samples).items() if (m := _mean([g.utilization_percent for g in s])) is not None}
    if len(means) < 2:
        return []
    busiest, idlest = max(means, key=means.__getitem__), min(means, key=means.__getitem__)
    spread = means[busiest] - means[idlest]
    if spread < rules.imbalance_spread_percent or means[busiest] < rules.imbalance_min_busy_percent:
        return []
    return [Finding(
        kind="gpu_imbalance",
        severity="critical" if spread >= rules.imbalance_critical_spread_percent else "warning",
        subjects=[f"gpu{i}" for i in means],
        summary=f"GPU {busiest} averaged {means[busiest]:.0f}% busy but GPU {idlest} only {means[idlest]:.0f}%",
        evidence={"mean_utilization_percent": {f"gpu{i}": round(m, 1) for i, m in means.items()},
                  "spread_percent": round(spread, 1), "busiest": f"gpu{busiest}", "idlest": f"gpu{idlest}"},
    )]


def _bubbles(stages: Sequence[StageStats], rules: BottleneckRules) -> list[Finding]:
    idle = {s.stage: s.idle_fraction for s in stages if s.seconds > 0}
    flagged = {k: v for k, v in idle.items() if v >= rules.bubble_idle_fraction}
    if not flagged:
        return []
    worst = max(flagged, key=flagged.__getitem__)
    return [Finding(
        kind="pipeline_bubble",
        severity="critical" if flagged[worst] >= rules.bubble_critical_idle_fraction else "warning",
        subjects=[f"stage{k}" for k in flagged],
        summary=f"pipeline stage {worst} waited {flagged[worst]:.0%} of its step time",
        evidence={"idle_fraction": {f"stage{k}": round(v, 3) for k, v in idle.items()},
                  "stages": len(idle), "worst_stage": worst},
    )]


def _host_bound(samples: Sequence[MetricsSnapshot], rules: BottleneckRules) -> list[Finding]:
    running = [s for s in samples if s.job_running and s.gpus]
    if len(running) < rules.min_samples:
        return []
    gpu_mean = _mean([g.utilization_percent for s in running for g in s.gpus])
    if gpu_mean is None or gpu_mean >= rules.host_bound_gpu_percent:
        return []
    cpu_mean = fmean(s.host.cpu_percent for s in running)
    per_process: dict[int, list[float | None]] = defaultdict(list)
    for s in running:
        for p in s.host.processes:
            per_process[p.pid].append(p.cpu_percent)
    process_means = {pid: m for pid, v in per_process.items() if (m := _mean(v)) is not None}
    busiest = max(process_means, key=process_means.__getitem__, default=None)
    busiest_cpu = process_means.get(busiest, 0.0) if busiest is not None else 0.0
    if cpu_mean < rules.host_bound_cpu_percent and busiest_cpu < rules.host_bound_process_percent:
        return []
    cause = (f"the machine's CPUs averaged {cpu_mean:.0f}%" if cpu_mean >= rules.host_bound_cpu_percent
             else f"evalfleet process {busiest} kept one core {busiest_cpu:.0f}% busy")
    return [Finding(
        kind="host_bound", severity="warning", subjects=["host"],
        summary=f"GPUs averaged {gpu_mean:.0f}% busy while {cause}",
        evidence={"gpu_mean_utilization_percent": round(gpu_mean, 1), "host_cpu_percent": round(cpu_mean, 1),
                  "busiest_process": busiest, "busiest_process_cpu_percent": round(busiest_cpu, 1)},
    )]


def _throttling(samples: Sequence[MetricsSnapshot], rules: BottleneckRules) -> list[Finding]:
    findings = []
    for kind, reasons in (("thermal_throttling", THERMAL_REASONS), ("power_throttling", POWER_REASONS)):
        evidence: dict[str, Any] = {}
        hardware = False
        for index, series in _per_gpu(samples).items():
            known = [g for g in series if g.throttle_mask is not None]
            hits = [g for g in known if reasons.intersection(g.throttle_reasons)]
            if not known or len(hits) / len(known) < rules.throttle_fraction:
                continue
            hardware |= any(r.startswith("hw_") for g in hits for r in g.throttle_reasons if r in reasons)
            clock, top = _mean([g.sm_clock_mhz for g in hits]), series[-1].sm_clock_max_mhz
            evidence[f"gpu{index}"] = {
                "throttled_fraction": round(len(hits) / len(known), 3),
                "reasons": sorted({r for g in hits for r in g.throttle_reasons if r in reasons}),
                "max_temperature_c": max((g.temperature_c for g in hits if g.temperature_c is not None), default=None),
                "mean_power_w": _mean([g.power_w for g in hits]),
                "power_limit_w": series[-1].power_limit_w,
                "mean_sm_clock_mhz": round(clock, 1) if clock is not None else None,
                "max_sm_clock_mhz": top,
                "clock_fraction": round(clock / top, 3) if clock is not None and top else None,
            }
        if evidence:
            what = "temperature" if kind == "thermal_throttling" else "power limit"
            findings.append(Finding(
                kind=kind, subjects=list(evidence),
                severity="critical" if hardware else ("warning" if kind == "thermal_throttling" else "info"),
                summary=f"{', '.join(evidence)} slowed clocks for {what} in "
                        f"{max(e['throttled_fraction'] for e in evidence.values()):.0%} of samples",
                evidence=evidence,
            ))
    return findings


def find_bottlenecks(
    samples: Sequence[MetricsSnapshot],
    communication: CommunicationStats | None = None,
    stages: Sequence[StageStats] = (),
    rules: BottleneckRules | None = None,
) -> list[Finding]:
    """Every finding the window supports, most severe first; none from fewer than `min_samples` samples."""
    rules = rules or BottleneckRules()
    findings: list[Finding] = []
    if communication is not None:
        findings += _communication(communication, rules)
    findings += _bubbles(stages, rules)
    if len(samples) >= rules.min_samples:
        findings += _near_oom(samples, rules)
        findings += _imbalance(samples, rules)
        findings += _host_bound(samples, rules)
        findings += _throttling(samples, rules)
    return sorted(findings, key=lambda f: _RANK[f.severity])
