"""What the engine reports about collectives and steps, turned into bandwidth and shares."""

from __future__ import annotations

import pytest

from evalfleet.monitoring.communication import CommunicationTracker, traffic_factor


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_recent_share_forgets_what_left_the_window_but_the_run_share_does_not():
    clock = Clock()
    tracker = CommunicationTracker(window_s=10.0, clock=clock)
    tracker.record("all_reduce", 10**9, 1.0, [0, 1])
    tracker.record_step(2.0)
    assert tracker.stats().recent_share == pytest.approx(0.5)
    clock.now = 30.0
    tracker.record("all_reduce", 10**8, 0.1, [0, 1])
    tracker.record_step(2.0)
    stats = tracker.stats()
    assert stats.recent_share == pytest.approx(0.05)
    assert stats.share == pytest.approx(1.1 / 4.0)
    clock.now = 100.0
    assert tracker.stats().recent_share is None  # no step in the window: unknown, not zero


@pytest.mark.parametrize(
    "kind, ranks, factor",
    [("all_reduce", 8, 1.75), ("all_reduce", 2, 1.0), ("all_gather", 4, 0.75), ("reduce_scatter", 4, 0.75),
     ("broadcast", 8, 1.0), ("send", 2, 1.0), ("all_reduce", 1, 1.0)],
)
def test_bus_bandwidth_factors_follow_nccl_tests(kind, ranks, factor):
    assert traffic_factor(kind, ranks) == pytest.approx(factor)


def test_kinds_are_normalised_and_links_named_by_device_group():
    tracker = CommunicationTracker()
    tracker.record("AllReduce", 100, 1.0, [3, 1, 2, 0])
    tracker.record("all-reduce", 100, 1.0, ["cuda:1", "cuda:0"])
    tracker.record("send", 100, 1.0, [10, 2])
    links = {link.link: link for link in tracker.stats().links}
    assert set(links) == {"0-1-2-3", "cuda:0-cuda:1", "2-10"}
    assert links["0-1-2-3"].kinds == ["all_reduce"] and links["cuda:0-cuda:1"].kinds == ["all_reduce"]
    assert links["0-1-2-3"].bus_bandwidth_bytes_per_s == pytest.approx(150.0)


def test_stage_idle_time_needs_busy_seconds():
    tracker = CommunicationTracker()
    tracker.record_step(1.0, stage=0)  # no busy time: the stage's idle time is unknown
    tracker.record_step(1.0, stage=1, busy_seconds=0.25)
    tracker.record_step(1.0, stage=1, busy_seconds=2.0)  # clamped to the step
    (stage,) = tracker.stages()
    assert stage.stage == 1 and stage.steps == 2
    assert stage.idle_fraction == pytest.approx(0.375)
    assert tracker.stats().steps == 3
