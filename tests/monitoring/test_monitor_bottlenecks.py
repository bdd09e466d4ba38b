"""Bottleneck rules on synthetic metric streams: each rule has a case that fires it and one that must not."""

from __future__ import annotations

import pytest
from synthetic_metrics import gpu, snapshot

from evalfleet.monitoring.bottlenecks import find_bottlenecks
from evalfleet.monitoring.snapshot import CommunicationStats, LinkStats, StageStats
from evalfleet.monitoring.suggestions import RunLayout, suggest


def stream(n: int = 10, **kwargs):
    return [snapshot(t=i, **kwargs) for i in range(n)]


def two_gpus(a: dict, b: dict) -> list:
    return [gpu(0, **a), gpu(1, **b)]


def comm(share: float | None) -> CommunicationStats:
    link = LinkStats(link="0-1-2-3", kinds=["all_reduce"], events=100, bytes=4 * 10**9, seconds=2.0,
                     bandwidth_bytes_per_s=2e9, bus_bandwidth_bytes_per_s=3e9)
    return CommunicationStats(events=100, bytes=4 * 10**9, seconds=2.0, steps=50,
                              step_seconds=2.0 / share if share else 0.0, share=share, links=[link])


def stages(*idle: float) -> list[StageStats]:
    return [StageStats(stage=i, steps=10, seconds=10.0, busy_seconds=10.0 * (1 - f)) for i, f in enumerate(idle)]


CASES = [
    # (case id, samples, communication, stages, kind expected or None, severity)
    ("comm-bound", stream(), comm(0.25), [], "communication_bound", "warning"),
    ("comm-bound-critical", stream(), comm(0.40), [], "communication_bound", "critical"),
    ("comm-light", stream(), comm(0.05), [], None, None),
    ("comm-unknown-share", stream(), comm(None), [], None, None),
    ("near-oom-gpu", stream(gpus=two_gpus(dict(used_gib=74.0), dict(used_gib=40.0))), None, [],
     "near_oom", "warning"),
    ("near-oom-critical", stream(gpus=[gpu(used_gib=79.0)]), None, [], "near_oom", "critical"),
    ("near-oom-host", stream(host_memory_percent=95.0), None, [], "near_oom", "warning"),
    ("memory-fine", stream(gpus=[gpu(used_gib=60.0)], host_memory_percent=60.0), None, [], None, None),
    ("imbalance", stream(gpus=two_gpus(dict(util=95.0), dict(util=40.0))), None, [], "gpu_imbalance", "warning"),
    ("imbalance-critical", stream(gpus=two_gpus(dict(util=95.0), dict(util=10.0))), None, [],
     "gpu_imbalance", "critical"),
    ("balanced", stream(gpus=two_gpus(dict(util=95.0), dict(util=80.0))), None, [], None, None),
    ("all-idle-is-not-imbalance", stream(gpus=two_gpus(dict(util=25.0), dict(util=0.0)), job_running=False),
     None, [], None, None),
    ("bubble", stream(), None, stages(0.05, 0.30), "pipeline_bubble", "warning"),
    ("bubble-critical", stream(), None, stages(0.6, 0.1), "pipeline_bubble", "critical"),
    ("no-bubble", stream(), None, stages(0.05, 0.20), None, None),
    ("host-bound-machine", stream(gpus=[gpu(util=15.0)], cpu=96.0), None, [], "host_bound", "warning"),
    ("host-bound-one-core", stream(gpus=[gpu(util=15.0)], cpu=30.0, processes=[(100, 99.0)]), None, [],
     "host_bound", "warning"),
    ("idle-gpu-idle-cpu", stream(gpus=[gpu(util=15.0)], cpu=30.0, processes=[(100, 20.0)]), None, [], None, None),
    ("busy-cpu-busy-gpu", stream(gpus=[gpu(util=90.0)], cpu=96.0), None, [], None, None),
    ("busy-cpu-no-job", stream(gpus=[gpu(util=5.0)], cpu=96.0, job_running=False), None, [], None, None),
    ("thermal", [snapshot([gpu(temp=88, throttle=["sw_thermal"] if i % 2 else [], clock=1400)]) for i in range(10)],
     None, [], "thermal_throttling", "warning"),
    ("thermal-hardware", stream(gpus=[gpu(temp=92, throttle=["hw_thermal"], clock=1100)]), None, [],
     "thermal_throttling", "critical"),
    ("thermal-rare", [snapshot([gpu(throttle=["sw_thermal"] if i == 0 else [])]) for i in range(10)], None, [],
     None, None),
    ("power-cap", stream(gpus=[gpu(power=699.0, throttle=["sw_power_cap"], clock=1700)]), None, [],
     "power_throttling", "info"),
    ("power-brake", stream(gpus=[gpu(throttle=["hw_power_brake"])]), None, [], "power_throttling", "critical"),
    ("idle-clocks-are-not-throttling",
     stream(gpus=[gpu(util=0.0, throttle=["gpu_idle"], clock=345)], job_running=False), None, [], None, None),
    ("too-few-samples", stream(2, gpus=[gpu(used_gib=79.0)], cpu=99.0), None, [], None, None),
]


@pytest.mark.parametrize("samples, communication, stage_stats, kind, severity", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_rule(samples, communication, stage_stats, kind, severity):
    findings = find_bottlenecks(samples, communication, stage_stats)
    if kind is None:
        assert findings == []
        return
    assert [f.kind for f in findings] == [kind]
    assert findings[0].severity == severity
    assert findings[0].evidence and findings[0].summary and findings[0].subjects


def test_every_rule_has_a_firing_and_a_quiet_case():
    fired = {c[4] for c in CASES if c[4]}
    assert fired == {"communication_bound", "near_oom", "gpu_imbalance", "pipeline_bubble", "host_bound",
                     "thermal_throttling", "power_throttling"}


def test_evidence_carries_the_numbers():
    (finding,) = find_bottlenecks(stream(gpus=two_gpus(dict(util=95.0), dict(util=40.0))))
    assert finding.evidence["mean_utilization_percent"] == {"gpu0": 95.0, "gpu1": 40.0}
    assert finding.evidence["spread_percent"] == 55.0 and finding.evidence["idlest"] == "gpu1"
    (finding,) = find_bottlenecks(stream(), comm(0.25))
    assert finding.evidence["share"] == 0.25 and finding.evidence["slowest_link"] == "0-1-2-3"
    (finding,) = find_bottlenecks(stream(gpus=[gpu(temp=92, throttle=["hw_thermal"], clock=1100)]))
    assert finding.evidence["gpu0"]["clock_fraction"] == pytest.approx(1100 / 1980, abs=1e-3)
    assert finding.evidence["gpu0"]["max_temperature_c"] == 92


def test_findings_are_ordered_most_severe_first():
    samples = stream(gpus=[gpu(used_gib=79.5, power=699.0, throttle=["sw_power_cap"])])
    assert [f.severity for f in find_bottlenecks(samples, comm(0.2))] == ["critical", "warning", "info"]


@pytest.mark.parametrize(
    "layout, change",
    [
        (RunLayout(tp=4, dp=2), {"tp": 2, "dp": 4}),
        (RunLayout(tp=4, pp=1, dp=1, nvlink=False), {"tp": 1, "pp": 4}),
        (RunLayout(), {"tp": "halve", "dp": "double"}),
    ],
)
def test_communication_bound_suggests_a_concrete_layout(layout, change):
    (suggestion,) = suggest(find_bottlenecks(stream(), comm(0.30)), layout)
    assert suggestion.change == change
    assert "30%" in suggestion.expected_effect


def test_halving_tp_estimates_the_throughput_gain():
    (suggestion,) = suggest(find_bottlenecks(stream(), comm(0.30)), RunLayout(tp=8, dp=1))
    assert "tp=4, dp=2" in suggestion.action
    assert "about 15%" in suggestion.expected_effect and "21% more throughput" in suggestion.expected_effect


def test_bubble_suggestion_moves_the_stages_into_tensor_parallelism():
    (suggestion,) = suggest(find_bottlenecks(stream(), None, stages(0.4, 0.1, 0.1, 0.1)), RunLayout(pp=4))
    assert suggestion.change == {"tp": 4, "pp": 1} and suggestion.settings == ["--tp", "--pp"]
    assert "up to 40%" in suggestion.expected_effect
    (hybrid,) = suggest(find_bottlenecks(stream(), None, stages(0.4, 0.1)), RunLayout(tp=2, pp=2))
    assert hybrid.change == {"tp": 4, "pp": 1}


def test_token_budget_moves_with_the_finding():
    (host_bound,) = suggest(find_bottlenecks(stream(gpus=[gpu(util=15.0)], cpu=96.0)), RunLayout(max_batch_tokens=4096))
    assert host_bound.change == {"max_batch_tokens": 8192} and "raise the token budget" in host_bound.action
    (oom,) = suggest(find_bottlenecks(stream(gpus=[gpu(used_gib=79.0)])), RunLayout(max_batch_tokens=4096))
    assert oom.change == {"max_batch_tokens": 3072}
    (host_oom,) = suggest(find_bottlenecks(stream(host_memory_percent=95.0)))
    assert "fewer worker processes" in host_oom.action


def test_every_finding_kind_has_a_suggestion():
    findings = [f for c in CASES if c[4] for f in find_bottlenecks(c[1], c[2], c[3])]
    suggestions = suggest(findings)
    assert len(suggestions) == len(findings)
    assert all(s.action and s.expected_effect for s in suggestions)
    hardware = {"gpu_imbalance", "thermal_throttling", "power_throttling"}  # nothing of evalfleet's to change
    assert all(bool(s.change) != (s.finding in hardware) for s in suggestions)
    thermal = next(s for s in suggestions if s.finding == "thermal_throttling")
    assert "recovers up to" in thermal.expected_effect
