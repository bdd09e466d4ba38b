"""Host readings through psutil: the machine's CPUs and memory, and evalfleet's own processes.

psutil reports CPU percentages relative to its previous call, so the collector keeps its
`Process` objects between samples and marks a process's first reading as unknown (`None`)
instead of psutil's meaningless first 0.0. Listing children walks every process on the
machine, so it is refreshed every `children_refresh_s` rather than at every sample.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import psutil

from evalfleet.monitoring.snapshot import HostMetrics, ProcessMetrics, ProcessRole
from evalfleet.types import UsageError

_MIN_CPU_WINDOW_S = 0.1


class HostCollector:
    def __init__(self, children_refresh_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._children_refresh_s = children_refresh_s
        self._children_at: float | None = None
        self._children: set[int] = set()
        self._registered: set[int] = set()
        self._processes: dict[int, psutil.Process] = {}
        own = self._processes[os.getpid()] = psutil.Process()
        own.cpu_percent()
        psutil.cpu_percent(percpu=True)
        self._primed_at = clock()
        self.cpu_count = psutil.cpu_count() or 1

    def register(self, pid: int) -> None:
        """Count `pid` (a worker evalfleet started some other way) among evalfleet's processes."""
        if not psutil.pid_exists(pid):
            raise UsageError(f"there is no process with pid {pid} to monitor")
        self._registered.add(pid)

    def unregister(self, pid: int) -> None:
        self._registered.discard(pid)

    @property
    def registered(self) -> frozenset[int]:
        return frozenset(self._registered)

    def _roles(self) -> dict[int, ProcessRole]:
        now = self._clock()
        if self._children_at is None or now - self._children_at >= self._children_refresh_s:
            try:
                self._children = {c.pid for c in psutil.Process().children(recursive=True)}
            except psutil.Error:
                self._children = set()
            self._children_at = now
        roles: dict[int, ProcessRole] = {pid: "registered" for pid in self._registered}
        roles.update({pid: "child" for pid in self._children})
        roles[os.getpid()] = "self"
        return roles

    def _measure(self, pid: int, role: ProcessRole) -> ProcessMetrics | None:
        process = self._processes.get(pid)
        first = process is None
        try:
            if process is None:
                process = self._processes[pid] = psutil.Process(pid)
            with process.oneshot():
                rss = process.memory_info().rss
                cpu = process.cpu_percent()
                name = process.name()
        except psutil.Error:
            self._processes.pop(pid, None)
            self._registered.discard(pid)
            self._children.discard(pid)
            return None
        return ProcessMetrics(pid=pid, name=name, role=role, rss_bytes=rss, cpu_percent=None if first else cpu)

    def collect(self) -> HostMetrics:
        waited = self._clock() - self._primed_at
        if waited < _MIN_CPU_WINDOW_S:
            time.sleep(_MIN_CPU_WINDOW_S - waited)
        per_cpu = [float(v) for v in psutil.cpu_percent(percpu=True)]
        memory = psutil.virtual_memory()
        roles = self._roles()
        for gone in set(self._processes) - set(roles):
            del self._processes[gone]
        processes = [m for pid, role in sorted(roles.items()) if (m := self._measure(pid, role)) is not None]
        return HostMetrics(
            cpu_percent=sum(per_cpu) / len(per_cpu) if per_cpu else 0.0,
            per_cpu_percent=per_cpu,
            cpu_count=self.cpu_count,
            memory_used_bytes=int(memory.total - memory.available),
            memory_total_bytes=int(memory.total),
            memory_percent=float(memory.percent),
            processes=processes,
        )
