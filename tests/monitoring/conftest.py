"""Fixtures for the monitor: a fake NVML at the pynvml boundary, and monitors closed after each test."""

from __future__ import annotations

from typing import Any

import pytest
from fake_nvml import FakeGpu, FakeNvml

from evalfleet.monitoring import MultiGPUPerformanceMonitor


@pytest.fixture
def fake_nvml() -> FakeNvml:
    return FakeNvml([FakeGpu(0), FakeGpu(1)])


@pytest.fixture
def make_monitor():
    """Builds monitors and closes them (sampler thread, NVML, database) after the test."""
    made: list[MultiGPUPerformanceMonitor] = []

    def build(**kwargs: Any) -> MultiGPUPerformanceMonitor:
        monitor = MultiGPUPerformanceMonitor(**kwargs)
        made.append(monitor)
        return monitor

    yield build
    for monitor in made:
        monitor.close()
