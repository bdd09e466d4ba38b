"""What the engines tell the monitor about their collectives and steps.

NVML cannot tell compute from communication, so the distributed engine reports each
collective (`record`) and each step (`record_step`); the share of step time spent
communicating is their ratio. Both must come from the same rank (or the same set of
ranks), otherwise the ratio mixes timelines.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from evalfleet.monitoring.snapshot import CommunicationStats, LinkStats, StageStats
from evalfleet.types import UsageError


def traffic_factor(kind: str, ranks: int) -> float:
    """Bytes each rank moves per byte of payload, as nccl-tests' bus bandwidth counts them."""
    if ranks < 2:
        return 1.0
    if kind == "all_reduce":
        return 2.0 * (ranks - 1) / ranks
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (ranks - 1) / ranks
    return 1.0


def _kind(kind: str) -> str:
    normal = kind.strip().lower().replace("-", "_")
    if not normal:
        raise UsageError("a communication event needs a kind such as 'all_reduce' or 'send'")
    return {"allreduce": "all_reduce", "allgather": "all_gather", "reducescatter": "reduce_scatter"}.get(
        normal, normal
    )


@dataclass
class _Link:
    kinds: set[str] = field(default_factory=set)
    events: int = 0
    bytes: int = 0
    seconds: float = 0.0
    bus_bytes: float = 0.0


@dataclass
class _Stage:
    steps: int = 0
    seconds: float = 0.0
    busy_seconds: float = 0.0


class CommunicationTracker:
    def __init__(self, window_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._links: dict[str, _Link] = {}
        self._stages: dict[int, _Stage] = {}
        self._events = 0
        self._bytes = 0
        self._seconds = 0.0
        self._steps = 0
        self._step_seconds = 0.0
        self._recent_comm: deque[tuple[float, float]] = deque()
        self._recent_steps: deque[tuple[float, float]] = deque()

    def record(self, kind: str, nbytes: int, seconds: float, devices: Sequence[int | str]) -> None:
        if nbytes < 0 or seconds < 0:
            raise UsageError("a communication event needs non-negative bytes and seconds")
        kind = _kind(kind)
        names = sorted({str(d) for d in devices}, key=lambda d: (len(d), d))
        link_name = "-".join(names) if names else "unknown"
        now = self._clock()
        with self._lock:
            link = self._links.setdefault(link_name, _Link())
            link.kinds.add(kind)
            link.events += 1
            link.bytes += int(nbytes)
            link.seconds += seconds
            link.bus_bytes += nbytes * traffic_factor(kind, len(names))
            self._events += 1
            self._bytes += int(nbytes)
            self._seconds += seconds
            self._recent_comm.append((now, seconds))
            self._prune(self._recent_comm, now)

    def record_step(self, seconds: float, stage: int | None = None, busy_seconds: float | None = None) -> None:
        """One step (a forward pass, a micro-batch) took `seconds`; pipeline stage `stage` was busy
        `busy_seconds` of it. Stage idle time is known only from steps that give both."""
        if seconds <= 0:
            raise UsageError("a step must take a positive number of seconds")
        if busy_seconds is not None and busy_seconds < 0:
            raise UsageError("a step's busy seconds cannot be negative")
        now = self._clock()
        with self._lock:
            self._steps += 1
            self._step_seconds += seconds
            self._recent_steps.append((now, seconds))
            self._prune(self._recent_steps, now)
            if stage is not None and busy_seconds is not None:
                entry = self._stages.setdefault(int(stage), _Stage())
                entry.steps += 1
                entry.seconds += seconds
                entry.busy_seconds += min(seconds, busy_seconds)

    def _prune(self, entries: deque[tuple[float, float]], now: float) -> None:
        while entries and now - entries[0][0] > self._window_s:
            entries.popleft()

    def _recent(self, entries: deque[tuple[float, float]], now: float) -> float:
        self._prune(entries, now)
        return sum(seconds for _, seconds in entries)

    def stats(self) -> CommunicationStats:
        now = self._clock()
        with self._lock:
            recent_comm = self._recent(self._recent_comm, now)
            recent_steps = self._recent(self._recent_steps, now)
            links = [
                LinkStats(
                    link=name,
                    kinds=sorted(link.kinds),
                    events=link.events,
                    bytes=link.bytes,
                    seconds=link.seconds,
                    bandwidth_bytes_per_s=link.bytes / link.seconds if link.seconds > 0 else None,
                    bus_bandwidth_bytes_per_s=link.bus_bytes / link.seconds if link.seconds > 0 else None,
                )
                for name, link in sorted(self._links.items())
            ]
            return CommunicationStats(
                events=self._events,
                bytes=self._bytes,
                seconds=self._seconds,
                steps=self._steps,
                step_seconds=self._step_seconds,
                share=self._seconds / self._step_seconds if self._step_seconds > 0 else None,
                recent_share=recent_comm / recent_steps if recent_steps > 0 else None,
                links=links,
            )

    def stages(self) -> list[StageStats]:
        with self._lock:
            return [
                StageStats(stage=index, steps=s.steps, seconds=s.seconds, busy_seconds=s.busy_seconds)
                for index, s in sorted(self._stages.items())
            ]
