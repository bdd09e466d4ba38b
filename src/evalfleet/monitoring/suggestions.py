"""Turning findings into changes a user can make, each with the effect it should have.

The estimates are first-order and say so: they assume the step time splits into compute and
communication and that the change moves only the part the finding is about. Every key of a
suggestion's `change` is a setting of `evalfleet run` (`tp` is `--tp`, `max_batch_tokens` is
`--max-batch-tokens`); findings about the hardware itself (throttling, another process on a
GPU) change no setting and say what to check instead.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from evalfleet.monitoring.alerts import Severity
from evalfleet.monitoring.bottlenecks import Finding, FindingKind



class RunLayout(BaseModel):
    """What the monitor knows of the run's layout; the engine sets it through `monitor.set_layout`."""

    model_config = ConfigDict(extra="forbid")

    tp: int | None = Field(default=None, ge=1)
    pp: int | None = Field(default=None, ge=1)
    dp: int | None = Field(default=None, ge=1)
    max_batch_tokens: int | None = Field(default=None, ge=1)
    nvlink: bool | None = Field(default=None, description="None: unknown (taken from NVML when it can tell)")


class Suggestion(BaseModel):
    finding: FindingKind
    severity: Severity
    action: str
    expected_effect: str
    change: dict[str, Any] = Field(default_factory=dict, description="settings to change, e.g. {'tp': 2, 'dp': 4}")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def settings(self) -> list[str]:
        """The `evalfleet run` options this suggestion changes."""
        return [f"--{key.replace('_', '-')}" for key in self.change]


def _communication(finding: Finding, layout: RunLayout) -> Suggestion:
    share = float(finding.evidence["share"])
    tp, pp, dp = layout.tp, layout.pp or 1, layout.dp or 1
    if layout.nvlink is False and tp and tp > 1:
        return Suggestion(
            finding=finding.kind, severity=finding.severity, change={"tp": 1, "pp": tp * pp},
            action=f"prefer pipeline to tensor parallelism on this node without NVLink: use tp=1, pp={tp * pp}",
            expected_effect=f"stages exchange one activation per boundary instead of an all-reduce per layer over "
                            f"PCIe, so the {share:.0%} communication share should fall to a few percent; keep at "
                            f"least {4 * tp * pp} micro-batches in flight to limit pipeline bubbles",
        )
    gain = (1 - share / 2) / (1 - share) - 1 if share < 1 else None
    effect = f"communication share from {share:.0%} to about {share / 2:.0%}"
    if gain is not None:
        effect += f", about {gain:.0%} more throughput per GPU"
    effect += ", if the model still fits: each GPU holds twice the weights"
    if tp and tp >= 2:
        return Suggestion(
            finding=finding.kind, severity=finding.severity, change={"tp": tp // 2, "dp": dp * 2},
            action=f"halve tensor parallelism and double the data-parallel replicas: tp={tp // 2}, dp={dp * 2}",
            expected_effect=effect,
        )
    return Suggestion(
        finding=finding.kind, severity=finding.severity, change={"tp": "halve", "dp": "double"},
        action="halve tensor parallelism and double the data-parallel replicas",
        expected_effect=effect,
    )


def _near_oom(finding: Finding, layout: RunLayout) -> Suggestion:
    if finding.subjects == ["host"]:
        fewer = layout.dp - 1 if layout.dp and layout.dp > 1 else "fewer replicas on this host"
        return Suggestion(
            finding=finding.kind, severity=finding.severity, change={"dp": fewer},
            action="run fewer worker processes on this host (--dp), or load weights with a lower-precision dtype",
            expected_effect="host memory falls by one worker's resident set per process removed",
        )
    budget = layout.max_batch_tokens
    change: dict[str, Any] = {"max_batch_tokens": int(budget * 0.75) if budget else "lower by 25%"}
    target = f"max_batch_tokens={change['max_batch_tokens']}" if budget else "a 25% smaller token budget"
    return Suggestion(
        finding=finding.kind, severity=finding.severity, change=change,
        action=f"lower the token budget to {target}, or raise pp to spread the layers over more GPUs",
        expected_effect="activation and KV-cache memory scale with the token budget, so the non-weight part of "
                        "peak memory falls by about a quarter",
    )


def _imbalance(finding: Finding, _: RunLayout) -> Suggestion:
    ev = finding.evidence
    return Suggestion(
        finding=finding.kind, severity=finding.severity,
        action=f"check what else runs on {ev['idlest']} or holds it back: this job's replicas already pull "
               f"batches from one shared queue, so a GPU of the job that idles is slowed from outside",
        expected_effect=f"mean utilization up by as much as half the {ev['spread_percent']:.0f}-point spread",
    )


def _bubble(finding: Finding, layout: RunLayout) -> Suggestion:
    pp = layout.pp or int(finding.evidence["stages"])
    tp = (layout.tp or 1) * pp
    worst = max(finding.evidence["idle_fraction"].values())
    return Suggestion(
        finding=finding.kind, severity=finding.severity, change={"tp": tp, "pp": 1},
        action=f"use tensor instead of pipeline parallelism over the same GPUs: tp={tp}, pp=1 (each batch's "
               f"micro-batches fill and drain the {pp} stages, and the slowest stage sets the pace)",
        expected_effect=f"stage idle time of up to {worst:.0%} goes, at the cost of an all-reduce per layer; "
                        f"worth it over NVLink, less so over PCIe",
    )


def _host_bound(finding: Finding, layout: RunLayout) -> Suggestion:
    budget = layout.max_batch_tokens
    change: dict[str, Any] = {"max_batch_tokens": budget * 2} if budget else {"max_batch_tokens": "double"}
    target = f"max_batch_tokens={budget * 2}" if budget else "twice the token budget"
    return Suggestion(
        finding=finding.kind, severity=finding.severity, change=change,
        action=f"raise the token budget to {target} so each forward pass carries more tokens per Python "
               f"round-trip, and tokenize ahead of the run",
        expected_effect=f"host overhead per token halves, lifting GPU utilization from "
                        f"{finding.evidence['gpu_mean_utilization_percent']:.0f}% toward what the GPUs can do",
    )


def _throttling(finding: Finding, _: RunLayout) -> Suggestion:
    fractions = [e["clock_fraction"] for e in finding.evidence.values() if e.get("clock_fraction")]
    lost = f"up to {1 - min(fractions):.0%} of the SM clock" if fractions else "the clock the GPUs lose"
    if finding.kind == "thermal_throttling":
        return Suggestion(
            finding=finding.kind, severity=finding.severity,
            action=f"check cooling and airflow for {', '.join(finding.subjects)}; a slightly lower power limit "
                   f"also keeps clocks steadier than thermal slowdown",
            expected_effect=f"recovers {lost}",
        )
    return Suggestion(
        finding=finding.kind, severity=finding.severity,
        action="raise the power limit (nvidia-smi -pl) if the site allows it; at full load some power capping "
               "is normal",
        expected_effect=f"recovers {lost}",
    )


def _preemption(finding: Finding, layout: RunLayout) -> Suggestion:
    tp = layout.tp or 1
    return Suggestion(
        finding=finding.kind, severity=finding.severity, change={"tp": tp * 2},
        # max_num_seqs is an engine argument, not a `run` option: it goes through the environment
        action=f"raise tp to {tp * 2} so each GPU holds less of the weights and more KV cache, or lower vLLM's "
               f"max_num_seqs from its default of 256 (EVALFLEET_VLLM_ENGINE_ARGS='{{\"max_num_seqs\": 128}}')",
        expected_effect="fewer sequences share the KV cache, so none is evicted and recomputed; "
                        f"the {finding.evidence.get('per_1000', '?')} preemptions per 1,000 requests should fall to about none",
    )


_RULES = {
    "communication_bound": _communication,
    "near_oom": _near_oom,
    "gpu_imbalance": _imbalance,
    "pipeline_bubble": _bubble,
    "host_bound": _host_bound,
    "thermal_throttling": _throttling,
    "power_throttling": _throttling,
    "kv_cache_preemption": _preemption,
}


def suggest(findings: list[Finding], layout: RunLayout | None = None) -> list[Suggestion]:
    layout = layout or RunLayout()
    return [_RULES[f.kind](f, layout) for f in findings]
