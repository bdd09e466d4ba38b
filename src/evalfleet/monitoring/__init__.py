"""Performance monitoring: NVML and host collectors, `MultiGPUPerformanceMonitor`, alerts,
bottleneck findings with suggestions, and a Prometheus exporter with dcgm-exporter names.

This package imports only `evalfleet.types` from evalfleet, so any layer may use it.
The exporter (prometheus-client) and the console view (rich) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from evalfleet.monitoring.alerts import Alert, AlertBook, AlertThresholds
from evalfleet.monitoring.bottlenecks import BottleneckRules, Finding, find_bottlenecks
from evalfleet.monitoring.monitor import MultiGPUPerformanceMonitor
from evalfleet.monitoring.snapshot import (
    CommunicationStats,
    GPUMetrics,
    HostMetrics,
    LinkStats,
    MetricsSnapshot,
    ProcessMetrics,
    StageStats,
)
from evalfleet.monitoring.suggestions import RunLayout, Suggestion, suggest

_LAZY = {
    "render_prometheus": "evalfleet.monitoring.exporter",
    "start_http_exporter": "evalfleet.monitoring.exporter",
    "registry_for": "evalfleet.monitoring.exporter",
}

__all__ = [
    "Alert",
    "AlertBook",
    "AlertThresholds",
    "BottleneckRules",
    "CommunicationStats",
    "Finding",
    "GPUMetrics",
    "HostMetrics",
    "LinkStats",
    "MetricsSnapshot",
    "MultiGPUPerformanceMonitor",
    "ProcessMetrics",
    "RunLayout",
    "StageStats",
    "Suggestion",
    "find_bottlenecks",
    "registry_for",
    "render_prometheus",
    "start_http_exporter",
    "suggest",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'evalfleet.monitoring' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
