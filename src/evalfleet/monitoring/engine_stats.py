"""vLLM's own engine statistics, per replica: KV-cache use, queues, preemptions, tokens/s.

A vLLM replica reports its counters and gauges after every batch. When the KV cache is full,
vLLM preempts running requests and recomputes them later, which costs throughput without any
error; the rule here turns a preemption count into a finding and a concrete fix.
"""

from __future__ import annotations

import threading
from typing import Any

from evalfleet.monitoring.bottlenecks import Finding

# Preemptions per thousand requests above which the run is slowed: a few are harmless.
PREEMPTIONS_PER_1000_WARNING = 5.0
PREEMPTIONS_PER_1000_CRITICAL = 50.0
_COUNTERS = ("requests", "generate_calls", "preemptions", "prompt_tokens", "generation_tokens", "busy_seconds")


class EngineStatsTracker:
    """The latest stats of each replica, and totals over the run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, dict[str, float]] = {}

    def record(self, replica: str, stats: dict[str, float]) -> None:
        """`stats` are the replica's totals so far (counters never go down), so the latest replaces the last."""
        with self._lock:
            self._latest[replica] = dict(stats)

    def summary(self) -> dict[str, Any] | None:
        """Totals over replicas (counters add up, KV-cache use is the peak), or None without an engine."""
        with self._lock:
            if not self._latest:
                return None
            replicas = {name: dict(stats) for name, stats in self._latest.items()}
        totals = {name: sum(stats.get(name, 0.0) for stats in replicas.values()) for name in _COUNTERS}
        busy = max((stats.get("busy_seconds", 0.0) for stats in replicas.values()), default=0.0)
        tokens = totals["prompt_tokens"] + totals["generation_tokens"]
        return {
            "replicas": replicas,
            **{name: round(value, 4) for name, value in totals.items()},
            "peak_kv_cache_usage": max((s.get("peak_kv_cache_usage", 0.0) for s in replicas.values()), default=0.0),
            "running": sum(stats.get("running", 0.0) for stats in replicas.values()),
            "waiting": sum(stats.get("waiting", 0.0) for stats in replicas.values()),
            "tokens_per_s": round(tokens / busy, 2) if busy > 0 else None,
        }

    def findings(self) -> list[Finding]:
        summary = self.summary()
        if summary is None or not summary["preemptions"]:
            return []
        return preemption_findings(summary["preemptions"], summary["requests"], summary["peak_kv_cache_usage"])


def preemption_findings(preemptions: float, requests: int, peak_kv_cache_usage: float) -> list[Finding]:
    """A finding when vLLM preempted enough requests (for want of KV cache) to slow the run."""
    rate = 1000.0 * preemptions / max(requests, 1)
    if rate < PREEMPTIONS_PER_1000_WARNING:
        return []
    severity = "critical" if rate >= PREEMPTIONS_PER_1000_CRITICAL else "warning"
    return [Finding(
        kind="kv_cache_preemption", severity=severity, subjects=["run"],
        summary=f"vLLM preempted {preemptions:.0f} requests ({rate:.0f} per 1,000) for want of KV cache; "
                "each is recomputed from the start",
        evidence={"preemptions": preemptions, "requests": requests, "per_1000": round(rate, 1),
                  "peak_kv_cache_usage": peak_kv_cache_usage},
    )]
