"""Threshold alerts with hysteresis, so a value hovering at a threshold raises one alert, not fifty.

An alert fires after `fire_after` consecutive samples at or past its threshold and clears
after `clear_after` consecutive samples back past a separate, safer clear level; values in
between keep the current state. The callback hears both transitions (check `alert.active`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evalfleet.monitoring.snapshot import MetricsSnapshot
from evalfleet.types import UsageError, describe_validation_error

log = logging.getLogger(__name__)

AlertRule = Literal["temperature", "memory", "power", "low_utilization", "communication", "xid"]
Severity = Literal["info", "warning", "critical"]


class AlertThresholds(BaseModel):
    """When to alert. Each rule has a firing level and a clear level on its safe side."""

    model_config = ConfigDict(extra="forbid")

    temperature_c: float = 85.0
    temperature_clear_c: float = 80.0
    memory_percent: float = Field(default=95.0, gt=0, le=100)
    memory_clear_percent: float = Field(default=90.0, ge=0, le=100)
    power_percent: float = Field(default=98.0, gt=0, description="percent of the enforced power limit")
    power_clear_percent: float = Field(default=90.0, ge=0)
    low_utilization_percent: float = Field(default=10.0, ge=0, le=100, description="only while a job runs")
    low_utilization_clear_percent: float = Field(default=30.0, ge=0, le=100)
    low_utilization_after: int = Field(default=60, ge=1, description="samples; loading a model idles GPUs")
    communication_share: float = Field(default=0.10, gt=0, le=1)
    communication_clear_share: float = Field(default=0.08, ge=0, le=1)
    xid_errors: bool = True
    fire_after: int = Field(default=2, ge=1, description="consecutive samples past a threshold")
    clear_after: int = Field(default=3, ge=1, description="consecutive samples past the clear level")

    @model_validator(mode="after")
    def _clear_levels_on_the_safe_side(self) -> AlertThresholds:
        pairs = [
            ("temperature", self.temperature_clear_c, self.temperature_c),
            ("memory", self.memory_clear_percent, self.memory_percent),
            ("power", self.power_clear_percent, self.power_percent),
            ("communication", self.communication_clear_share, self.communication_share),
        ]
        for name, clear, fire in pairs:
            if clear >= fire:
                raise ValueError(f"the {name} clear level must be below its alert level")
        if self.low_utilization_clear_percent <= self.low_utilization_percent:
            raise ValueError("the low-utilization clear level must be above its alert level")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> AlertThresholds:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as error:
            raise UsageError(f"cannot read alert thresholds from {path}: {error.strerror}") from None
        except yaml.YAMLError:
            raise UsageError(f"{path} is not valid YAML") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path} must hold a mapping of threshold names to values")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise UsageError(f"{path}: {describe_validation_error(error)}") from None


class Alert(BaseModel):
    rule: AlertRule
    subject: str = Field(description="'gpu<N>' or 'run'")
    severity: Severity
    message: str
    value: float
    threshold: float
    fired_at: float
    cleared_at: float | None = None

    @property
    def active(self) -> bool:
        return self.cleared_at is None


@dataclass(frozen=True)
class _Reading:
    """One rule's view of one subject in one sample: breached, safe, or in between (both False)."""

    rule: AlertRule
    subject: str
    value: float
    threshold: float
    breached: bool
    safe: bool
    message: str


@dataclass
class _State:
    over: int = 0
    under: int = 0
    alert: Alert | None = None


def _above(rule: AlertRule, subject: str, value: float, fire: float, clear: float, message: str) -> _Reading:
    return _Reading(rule, subject, value, fire, breached=value >= fire, safe=value < clear, message=message)


_SEVERITY: dict[AlertRule, Severity] = {
    "temperature": "warning",
    "memory": "critical",
    "power": "warning",
    "low_utilization": "warning",
    "communication": "warning",
    "xid": "critical",
}


class AlertBook:
    """Active and past alerts, updated once per sample by `evaluate`."""

    def __init__(
        self,
        thresholds: AlertThresholds | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        keep_past: int = 1000,
    ) -> None:
        self.thresholds = thresholds or AlertThresholds()
        self.on_alert = on_alert
        self._states: dict[tuple[str, str], _State] = {}
        self._past: deque[Alert] = deque(maxlen=keep_past)
        self._xid_seen: dict[int, int] = {}
        self._lock = threading.Lock()  # the sampler thread writes; exporters and summaries read
        self.fired_count = 0

    @property
    def active(self) -> list[Alert]:
        with self._lock:
            return [s.alert for s in self._states.values() if s.alert is not None]

    @property
    def past(self) -> list[Alert]:
        with self._lock:
            return list(self._past)

    def all(self) -> list[Alert]:
        return sorted(self.past + self.active, key=lambda a: a.fired_at)

    def _readings(self, snapshot: MetricsSnapshot) -> Iterator[_Reading]:
        t = self.thresholds
        for gpu in snapshot.gpus:
            subject, n = f"gpu{gpu.index}", gpu.index
            if (v := gpu.temperature_c) is not None:
                yield _above("temperature", subject, v, t.temperature_c, t.temperature_clear_c,
                             f"GPU {n} is at {v:.0f} C (alert at {t.temperature_c:.0f} C)")
            if (v := gpu.memory_percent) is not None:
                yield _above("memory", subject, v, t.memory_percent, t.memory_clear_percent,
                             f"GPU {n} memory is {v:.1f}% full (alert at {t.memory_percent:.0f}%)")
            if (v := gpu.power_percent) is not None:
                yield _above("power", subject, v, t.power_percent, t.power_clear_percent,
                             f"GPU {n} draws {v:.0f}% of its power limit (alert at {t.power_percent:.0f}%)")
            if (v := gpu.utilization_percent) is not None:
                running = snapshot.job_running
                yield _Reading("low_utilization", subject, v, t.low_utilization_percent,
                               breached=running and v <= t.low_utilization_percent,
                               safe=not running or v >= t.low_utilization_clear_percent,
                               message=f"GPU {n} is {v:.0f}% busy while a job runs "
                               f"(alert at {t.low_utilization_percent:.0f}% or less)")
            if t.xid_errors and gpu.xid_errors is not None:
                new = gpu.xid_errors - self._xid_seen.get(n, 0)
                self._xid_seen[n] = gpu.xid_errors
                yield _Reading("xid", subject, float(new), 0.0, breached=new > 0, safe=new == 0,
                               message=f"GPU {n} reported {new} new XID error(s); the last was XID {gpu.last_xid}")
        if (share := snapshot.communication.recent_share) is not None:
            yield _above("communication", "run", share, t.communication_share, t.communication_clear_share,
                         f"communication takes {share:.0%} of step time (alert above {t.communication_share:.0%})")

    def _fire_after(self, rule: AlertRule) -> int:
        if rule == "xid":
            return 1
        if rule == "low_utilization":
            return self.thresholds.low_utilization_after
        return self.thresholds.fire_after

    def evaluate(self, snapshot: MetricsSnapshot) -> list[Alert]:
        """Advance every rule by one sample; returns the alerts that fired or cleared now."""
        changed: list[Alert] = []
        with self._lock:
            for reading in self._readings(snapshot):
                self._advance(reading, snapshot.timestamp, changed)
        for alert in changed:
            self._notify(alert)
        return changed

    def _advance(self, reading: _Reading, timestamp: float, changed: list[Alert]) -> None:
        state = self._states.setdefault((reading.rule, reading.subject), _State())
        state.over = state.over + 1 if reading.breached else 0
        state.under = state.under + 1 if reading.safe else 0
        if state.alert is None and state.over >= self._fire_after(reading.rule):
            state.alert = Alert(
                rule=reading.rule, subject=reading.subject, severity=_SEVERITY[reading.rule],
                message=reading.message, value=reading.value, threshold=reading.threshold, fired_at=timestamp,
            )
            self.fired_count += 1
            changed.append(state.alert)
        elif state.alert is not None and state.under >= self.thresholds.clear_after:
            cleared = state.alert.model_copy(update={"cleared_at": timestamp})
            state.alert = None
            self._past.append(cleared)
            changed.append(cleared)

    def _notify(self, alert: Alert) -> None:
        if self.on_alert is None:
            return
        try:
            self.on_alert(alert)
        except Exception:  # a broken callback must not stop the sampler
            log.exception("alert callback failed for %s on %s", alert.rule, alert.subject)
