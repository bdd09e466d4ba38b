"""vLLM's engine stats in the monitor, and the KV-cache preemption rule (a firing and a quiet case)."""

from __future__ import annotations

import json

import pytest

from evalfleet.monitoring.suggestions import RunLayout, suggest


def stats(requests: int, preemptions: int, kv: float = 0.5, busy: float = 10.0) -> dict[str, float]:
    return {"requests": requests, "preemptions": preemptions, "prompt_tokens": 900.0, "generation_tokens": 100.0,
            "busy_seconds": busy, "kv_cache_usage": kv, "peak_kv_cache_usage": kv, "running": 0.0, "waiting": 0.0}


def test_engine_summary_adds_replicas_counters_and_keeps_the_peak(make_monitor):
    monitor = make_monitor(interval=60)
    assert monitor.summary()["engine"] is None  # no engine, no section content
    monitor.record_engine_stats("replica-0", stats(100, 0, kv=0.4))
    monitor.record_engine_stats("replica-1", stats(50, 0, kv=0.9, busy=5.0))
    monitor.record_engine_stats("replica-0", stats(200, 0, kv=0.3))  # totals so far replace the last report
    engine = monitor.summary()["engine"]
    assert engine["requests"] == 250 and engine["prompt_tokens"] == 1800
    assert engine["peak_kv_cache_usage"] == 0.9
    assert engine["tokens_per_s"] == pytest.approx(2000 / 10.0)
    assert json.loads(json.dumps(engine)) == engine
    assert all(f.kind != "kv_cache_preemption" for f in monitor.detect_bottlenecks())


@pytest.mark.parametrize("preemptions, severity", [(0, None), (4, None), (10, "warning"), (80, "critical")])
def test_preemption_rule_fires_above_its_rate(make_monitor, preemptions, severity):
    monitor = make_monitor(interval=60)
    monitor.record_engine_stats("replica-0", stats(1000, preemptions, kv=0.99))
    found = [f for f in monitor.detect_bottlenecks() if f.kind == "kv_cache_preemption"]
    if severity is None:
        assert found == []
        return
    assert [f.severity for f in found] == [severity]
    assert found[0].evidence["preemptions"] == preemptions and found[0].evidence["per_1000"] == preemptions


def test_preemption_suggestion_names_real_vllm_settings(make_monitor):
    monitor = make_monitor(interval=60)
    monitor.record_engine_stats("replica-0", stats(100, 30))
    monitor.set_layout(tp=2)
    (suggestion,) = [s for s in monitor.generate_optimization_suggestions() if s.finding == "kv_cache_preemption"]
    assert suggestion.change == {"tp": 4} and suggestion.settings == ["--tp"]
    assert "max_num_seqs" in suggestion.action and "EVALFLEET_VLLM_ENGINE_ARGS" in suggestion.action
    assert suggest(monitor.detect_bottlenecks(), RunLayout())[0].change["tp"] == 2
