"""Alert rules: each fires once, clears once, and does not flap around its threshold."""

from __future__ import annotations

import logging

import pytest
from synthetic_metrics import gpu, snapshot

from evalfleet.monitoring.alerts import AlertBook, AlertThresholds
from evalfleet.types import UsageError

FAST = AlertThresholds(fire_after=2, clear_after=2, low_utilization_after=3)


def _run(book: AlertBook, snapshots) -> list[tuple[int, str, bool]]:
    """(sample number, rule, active) for every transition."""
    return [(n, a.rule, a.active) for n, s in enumerate(snapshots) for a in book.evaluate(s)]


def test_temperature_fires_once_clears_once_and_does_not_flap():
    heard = []
    book = AlertBook(FAST, on_alert=heard.append)
    temps = [70, 86, 84, 86, 87, 84, 86, 84, 86, 82, 79, 82, 79, 78, 84, 86, 84]
    transitions = _run(book, [snapshot([gpu(temp=t)], t=n) for n, t in enumerate(temps)])
    # fires at the 2nd consecutive reading >= 85; hovering 82-86 keeps it; 2 readings < 80 clear it;
    # then 84, 86, 84 never gives 2 consecutive readings >= 85, so it stays clear.
    assert transitions == [(4, "temperature", True), (13, "temperature", False)]
    assert [a.active for a in heard] == [True, False]
    assert heard[0].subject == "gpu0" and heard[0].value == 87 and heard[0].threshold == 85
    assert heard[1].fired_at == 1_700_000_004.0 and heard[1].cleared_at == 1_700_000_013.0
    assert book.active == [] and [a.rule for a in book.past] == ["temperature"]
    assert book.fired_count == 1


def test_oscillating_at_the_threshold_never_fires():
    book = AlertBook(FAST)
    assert _run(book, [snapshot([gpu(temp=86 if n % 2 else 84)]) for n in range(20)]) == []


@pytest.mark.parametrize(
    "rule, breach, safe",
    [
        ("memory", dict(used_gib=77.0), dict(used_gib=60.0)),
        ("power", dict(power=695.0), dict(power=400.0)),
        ("temperature", dict(temp=91.0), dict(temp=50.0)),
    ],
)
def test_each_gpu_level_rule_fires_and_clears(rule, breach, safe):
    book = AlertBook(FAST)
    stream = [snapshot([gpu(1, **safe)])] + [snapshot([gpu(1, **breach)])] * 3 + [snapshot([gpu(1, **safe)])] * 3
    assert _run(book, stream) == [(2, rule, True), (5, rule, False)]
    assert book.past[0].subject == "gpu1"


def test_low_utilization_alerts_only_while_a_job_runs():
    book = AlertBook(FAST)
    idle_no_job = [snapshot([gpu(util=0.0)], job_running=False)] * 5
    assert _run(book, idle_no_job) == []
    idle_job = [snapshot([gpu(util=3.0)], job_running=True)] * 3
    assert _run(book, idle_job) == [(2, "low_utilization", True)]
    busy = [snapshot([gpu(util=20.0)])] * 3 + [snapshot([gpu(util=80.0)])] * 2
    assert _run(book, busy) == [(4, "low_utilization", False)]  # 20% is between the levels: no clear


def test_low_utilization_clears_when_the_job_ends():
    book = AlertBook(FAST)
    _run(book, [snapshot([gpu(util=0.0)])] * 3)
    assert _run(book, [snapshot([gpu(util=0.0)], job_running=False)] * 2) == [(1, "low_utilization", False)]


def test_communication_share_over_ten_percent_alerts_for_the_run():
    book = AlertBook(FAST)
    shares = [0.05, 0.12, 0.15, 0.09, 0.11, 0.07, 0.06]
    assert _run(book, [snapshot(share=s) for s in shares]) == [(2, "communication", True), (6, "communication", False)]
    assert book.past[0].subject == "run"
    assert _run(AlertBook(FAST), [snapshot(share=None)] * 5) == []


def test_new_xid_errors_alert_at_once_and_clear_after_quiet_samples():
    book = AlertBook(FAST)
    counts = [0, 0, 1, 1, 1, 3, 3, 3]
    transitions = _run(book, [snapshot([gpu(xid_errors=c, last_xid=79 if c else None)]) for c in counts])
    assert transitions == [(2, "xid", True), (4, "xid", False), (5, "xid", True), (7, "xid", False)]
    assert book.past[-1].severity == "critical" and "XID 79" in book.past[-1].message


def test_xid_alerts_can_be_switched_off():
    book = AlertBook(AlertThresholds(xid_errors=False))
    assert _run(book, [snapshot([gpu(xid_errors=n)]) for n in range(4)]) == []


def test_unknown_readings_keep_the_state():
    book = AlertBook(FAST)
    _run(book, [snapshot([gpu(temp=90)])] * 2)
    assert _run(book, [snapshot([gpu(temp=None)])] * 5) == []
    assert [a.rule for a in book.active] == ["temperature"]


def test_a_failing_callback_is_logged_not_raised(caplog):
    def broken(alert):
        raise RuntimeError("pager down")

    book = AlertBook(FAST, on_alert=broken)
    with caplog.at_level(logging.ERROR):
        changed = book.evaluate(snapshot([gpu(temp=95)])) + book.evaluate(snapshot([gpu(temp=95)]))
    assert [a.rule for a in changed] == ["temperature"]
    assert "alert callback failed" in caplog.text


def test_clear_levels_must_be_on_the_safe_side():
    with pytest.raises(ValueError, match="temperature clear level must be below"):
        AlertThresholds(temperature_c=80, temperature_clear_c=85)
    with pytest.raises(ValueError, match="low-utilization clear level must be above"):
        AlertThresholds(low_utilization_percent=40, low_utilization_clear_percent=30)


def test_thresholds_load_from_yaml(tmp_path):
    path = tmp_path / "alerts.yaml"
    path.write_text("temperature_c: 80\ntemperature_clear_c: 75\nfire_after: 1\n")
    loaded = AlertThresholds.from_yaml(path)
    assert (loaded.temperature_c, loaded.temperature_clear_c, loaded.fire_after) == (80, 75, 1)
    assert loaded.memory_percent == AlertThresholds().memory_percent


@pytest.mark.parametrize(
    "text, message",
    [
        ("temperature_c: [1, 2\n", "is not valid YAML"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("tempreature_c: 80\n", "invalid value for 'tempreature_c'"),
        ("fire_after: 0\n", "invalid value for 'fire_after'"),
    ],
)
def test_bad_threshold_files_are_one_sentence_usage_errors(tmp_path, text, message):
    path = tmp_path / "alerts.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as error:
        AlertThresholds.from_yaml(path)
    assert "\n" not in str(error.value)


def test_missing_threshold_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read alert thresholds"):
        AlertThresholds.from_yaml(tmp_path / "nope.yaml")
