"""`/metrics`: the fleet's job series next to the monitor's (GPU series under dcgm-exporter names)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from evalfleet.monitoring.exporter import MonitorCollector
from evalfleet.monitoring.monitor import MultiGPUPerformanceMonitor
from evalfleet.service.fleet import Fleet


class FleetCollector(Collector):
    """Reads the job store at scrape time."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        counts = self.fleet.job_counts()
        jobs = GaugeMetricFamily("evalfleet_jobs", "Jobs in the store by state.", labels=["state"])
        for state, count in counts["by_state"].items():
            jobs.add_metric([state], count)
        yield jobs
        yield SummaryMetricFamily("evalfleet_queue_wait_seconds", "From submission to first placement, per started job.",
                                  count_value=len(counts["waits"]), sum_value=sum(counts["waits"]))
        yield GaugeMetricFamily("evalfleet_queue_oldest_wait_seconds", "How long the longest-waiting queued job has waited.",
                                value=counts["oldest_queued_s"])
        speed = GaugeMetricFamily("evalfleet_job_tokens_per_second", "Tokens/s of each running job.", labels=["job"])
        for job, rate in counts["tokens_per_s"].items():
            speed.add_metric([job], rate)
        yield speed
        yield GaugeMetricFamily("evalfleet_tokens_per_second", "Tokens/s of all running jobs together.",
                                value=sum(counts["tokens_per_s"].values()))


def render_metrics(fleet: Fleet, monitor: MultiGPUPerformanceMonitor | None) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    if monitor is not None:
        registry.register(MonitorCollector(monitor))
    return generate_latest(registry).decode()
