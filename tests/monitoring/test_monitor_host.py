"""The host collector runs for real: this machine's CPUs and memory, and this test's processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from evalfleet.monitoring.host import HostCollector
from evalfleet.types import UsageError

SPIN_30_S = "import time\nend = time.time() + 30\nwhile time.time() < end: pass"


def _busy_child() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SPIN_30_S])


def test_machine_figures_match_psutil():
    host = HostCollector().collect()
    assert host.cpu_count == psutil.cpu_count()
    assert len(host.per_cpu_percent) == host.cpu_count
    assert all(0.0 <= v <= 100.0 for v in host.per_cpu_percent)
    assert host.cpu_percent == pytest.approx(sum(host.per_cpu_percent) / host.cpu_count)
    assert host.memory_total_bytes == psutil.virtual_memory().total
    assert 0 < host.memory_used_bytes < host.memory_total_bytes


def test_own_process_is_measured_from_the_first_sample():
    host = HostCollector().collect()
    own = [p for p in host.processes if p.pid == os.getpid()]
    assert len(own) == 1 and own[0].role == "self"
    assert own[0].rss_bytes == pytest.approx(psutil.Process().memory_info().rss, rel=0.2)
    assert own[0].cpu_percent is not None


def test_children_appear_and_their_cpu_is_unknown_until_a_second_reading():
    child = _busy_child()
    try:
        collector = HostCollector(children_refresh_s=0.0)
        first = {p.pid: p for p in collector.collect().processes}
        assert first[child.pid].role == "child" and first[child.pid].cpu_percent is None
        time.sleep(0.3)
        second = {p.pid: p for p in collector.collect().processes}
        assert second[child.pid].cpu_percent > 10.0  # it spins; psutil measures it over the 0.3 s
        host = collector.collect()
        assert host.workers_rss_bytes == sum(p.rss_bytes for p in host.processes)
    finally:
        child.kill()
        child.wait()
    assert child.pid not in {p.pid for p in collector.collect().processes}


def test_registered_pids_are_counted_until_they_exit():
    child = _busy_child()
    try:
        collector = HostCollector(children_refresh_s=3600.0)
        collector.collect()  # lists children now, before the new process is registered
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        collector.register(other.pid)
        roles = {p.pid: p.role for p in collector.collect().processes}
        assert roles[other.pid] == "registered"
        assert child.pid in roles
        other.kill()
        other.wait()
        assert other.pid not in {p.pid for p in collector.collect().processes}
        assert other.pid not in collector.registered
    finally:
        child.kill()
        child.wait()


def test_registering_a_missing_pid_is_a_usage_error():
    with pytest.raises(UsageError, match="no process with pid"):
        HostCollector().register(2**22 + 12345)


def test_unregister_forgets_a_pid():
    collector = HostCollector()
    collector.register(os.getppid())
    collector.unregister(os.getppid())
    assert collector.registered == frozenset()
