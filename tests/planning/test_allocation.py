"""Placing layouts on concrete GPUs."""

from __future__ import annotations

import pytest

from evalfleet.planning import GPU, Inventory, Node, ParallelLayout, PlacementError, place
from evalfleet.planning.hardware import GPU_SPECS
from evalfleet.types import EvalfleetError


def _node(free: list[float]) -> Node:
    spec = GPU_SPECS["A100-80GB"]
    return Node([GPU("A100-80GB", 80, f, (8, 0), spec) for f in free], "nvlink", 600)


def test_ranks_are_dp_major_and_tp_groups_stay_in_a_node():
    inventory = Inventory.from_spec("2x8xH100-80GB")
    placement = place(ParallelLayout(tp=4, pp=2, dp=2), inventory)
    assert len(placement) == len(set(placement)) == 16
    groups = [placement[i : i + 4] for i in range(0, 16, 4)]
    assert all(len({node for node, _ in group}) == 1 for group in groups)
    # each replica (two stages of four) fits one node, so no stage crosses nodes
    assert {n for n, _ in placement[:8]} != {n for n, _ in placement[8:]}
    assert all(len({n for n, _ in placement[r * 8 : r * 8 + 8]}) == 1 for r in range(2))


def test_pipeline_crosses_nodes_only_when_it_must():
    inventory = Inventory.from_spec("2x8xH100-80GB")
    placement = place(ParallelLayout(tp=8, pp=2), inventory)
    assert [n for n, _ in placement] == [0] * 8 + [1] * 8
    within = place(ParallelLayout(tp=2, pp=4), inventory)
    assert len({n for n, _ in within}) == 1


def test_busy_gpus_are_never_used_and_free_memory_is_preferred():
    inventory = Inventory([_node([80, 10, 80, 50, 80, 80, 30, 80])])
    busy = {(0, 0), (0, 2)}
    placement = place(ParallelLayout(tp=2), inventory, busy=busy)
    assert not set(placement) & busy
    assert set(placement) == {(0, 4), (0, 5)}
    assert place(ParallelLayout(dp=3), inventory, busy=busy, need_gb=40) == [(0, 4), (0, 5), (0, 7)]


def test_best_fitting_node_keeps_whole_nodes_free():
    inventory = Inventory([_node([80] * 8), _node([80] * 8)])
    busy = {(1, g) for g in range(6)}
    assert place(ParallelLayout(tp=2), inventory, busy=busy) == [(1, 6), (1, 7)]


def test_spanning_uses_the_largest_nodes_first():
    inventory = Inventory([_node([80] * 2), _node([80] * 4), _node([80] * 2)])
    placement = place(ParallelLayout(tp=2, pp=4), inventory)
    assert [n for n, _ in placement] == [1, 1, 1, 1, 0, 0, 2, 2]


@pytest.mark.parametrize(
    ("layout", "busy", "need", "message"),
    [
        (ParallelLayout(tp=16), set(), 0, "must stay inside one node"),
        (ParallelLayout(tp=8), {(0, 3)}, 0, "the most is 7"),
        (ParallelLayout(tp=4, dp=3), set(), 0, "needs 3 groups of 4"),
        (ParallelLayout(tp=2), set(), 90, "with 90.0 GB free"),
    ],
)
def test_refusals_say_why(layout, busy, need, message):
    inventory = Inventory.from_spec("8xA100-80GB")
    with pytest.raises(PlacementError, match=message) as info:
        place(layout, inventory, busy=busy, need_gb=need)
    assert isinstance(info.value, EvalfleetError) and "\n" not in str(info.value)


def test_cpu_holds_one_rank():
    inventory = Inventory.cpu(total_gb=16, free_gb=12)
    assert place(ParallelLayout(), inventory) == [(0, 0)]
    with pytest.raises(PlacementError, match="the CPU is one device"):
        place(ParallelLayout(dp=2), inventory)
