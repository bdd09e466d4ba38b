"""The monitor watches the job's GPUs only, and every suggestion names a setting of `evalfleet run`."""

from __future__ import annotations

import pytest
import typer
from fake_nvml import FakeGpu, FakeNvml
from test_monitor_bottlenecks import CASES

from evalfleet.monitoring.bottlenecks import find_bottlenecks
from evalfleet.monitoring.suggestions import RunLayout, suggest


@pytest.fixture
def four_gpus() -> FakeNvml:
    return FakeNvml([FakeGpu(i, utilization=90 if i == 1 else 0) for i in range(4)])


def _imbalance_after_samples(monitor) -> bool:
    monitor.job_running = True  # a job runs, so its idle GPUs count against it
    for _ in range(6):
        monitor.sample()
    return "gpu_imbalance" in [f.kind for f in monitor.detect_bottlenecks()]


def test_cuda_visible_devices_scopes_the_monitor_to_the_job(make_monitor, four_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monitor = make_monitor(nvml=four_gpus)
    assert [gpu.index for gpu in monitor.get_current_metrics().gpus] == [1]
    assert not _imbalance_after_samples(monitor)


def test_unscoped_the_other_jobs_idle_gpus_read_as_imbalance(make_monitor, four_gpus, monkeypatch):
    """The converse: the same node without a scope reports four GPUs and a critical imbalance."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monitor = make_monitor(nvml=four_gpus)
    assert len(monitor.get_current_metrics().gpus) == 4
    assert _imbalance_after_samples(monitor)


def test_uuids_and_the_engines_devices_narrow_the_scope(make_monitor, four_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{four_gpus.gpus[3].uuid},2")
    monitor = make_monitor(nvml=four_gpus)
    assert [gpu.index for gpu in monitor.sample().gpus] == [2, 3]
    monitor.set_layout(tp=1, pp=1, dp=1, devices=["cuda:1"])  # the job's cuda:1 is the second visible GPU
    assert [gpu.index for gpu in monitor.sample().gpus] == [2]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    unscoped = make_monitor(nvml=FakeNvml([FakeGpu(i) for i in range(4)]))
    unscoped.set_layout(devices=["cuda:0", "cuda:3"])
    assert [gpu.index for gpu in unscoped.sample().gpus] == [0, 3]
    unscoped.set_layout(devices=["cpu"])
    assert unscoped.sample().gpus == []


def _run_options() -> set[str]:
    from evalfleet.cli import app

    command = typer.main.get_command(app).commands["run"]
    return {option for param in command.params for option in param.opts}


LAYOUTS = [RunLayout(), RunLayout(tp=4, pp=1, dp=2, max_batch_tokens=4096, nvlink=False),
           RunLayout(tp=2, pp=2, dp=1, max_batch_tokens=1024, nvlink=True), RunLayout(pp=4)]


def test_every_suggestion_names_settings_that_evalfleet_run_has():
    options = _run_options()
    seen = set()
    for _, samples, communication, stages, kind, _ in CASES:
        for layout in LAYOUTS:
            for suggestion in suggest(find_bottlenecks(samples, communication, stages), layout):
                seen.add(suggestion.finding)
                assert suggestion.action and suggestion.expected_effect
                for setting in suggestion.settings:
                    assert setting in options, f"{suggestion.finding} suggests {setting}, which `evalfleet run` lacks"
                if suggestion.finding in ("communication_bound", "pipeline_bubble", "host_bound"):
                    assert suggestion.settings, f"{suggestion.finding} names no setting"
    # vLLM's preemptions come from its engine statistics, not from the samples
    from evalfleet.monitoring.engine_stats import preemption_findings

    for layout in LAYOUTS:
        for suggestion in suggest(preemption_findings(400, 1000, 0.99), layout):
            seen.add(suggestion.finding)
            assert suggestion.settings and set(suggestion.settings) <= options, suggestion.settings
    # every rule was walked, so a new rule with an invented setting is caught here too
    from evalfleet.monitoring.suggestions import _RULES

    assert seen == set(_RULES), set(_RULES) - seen
