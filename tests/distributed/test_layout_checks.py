"""Fast checks without worker processes: layout refusals, budget chunks, communication totals."""

from __future__ import annotations

import pytest

from evalfleet.runtime.backends.base import LoglikelihoodItem
from evalfleet.runtime.group import GroupSpec, check_layout
from evalfleet.runtime.parallel import StageCache
from evalfleet.runtime.timing import CommunicationTimer
from evalfleet.runtime.transport import CommunicationSummary
from evalfleet.runtime.runner import first_chunk
from evalfleet.types import EvalfleetError


@pytest.mark.parametrize(
    ("family", "tp", "pp", "message"),
    [
        ("llama", 3, 1, "tp=3 does not divide the model's 4 attention heads"),
        ("llama", 4, 1, "tp=4 does not divide the model's 2 key/value heads"),
        ("llama", 1, 3, "pp=3 is more stages than the model's 2 layers"),
        ("gpt_neox", 1, 2, "pipeline parallelism needs a Llama-style model"),
    ],
)
def test_layouts_the_model_cannot_take_are_refused_before_any_process_starts(family, tp, pp, message, tmp_path):
    from transformers import AutoConfig

    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    extra = {"num_key_value_heads": 2} if family == "llama" else {}
    AutoConfig.for_model(family, **common, **extra).save_pretrained(tmp_path)
    with pytest.raises(EvalfleetError, match=message):
        check_layout(GroupSpec(str(tmp_path), tp=tp, pp=pp))
    check_layout(GroupSpec(str(tmp_path), tp=2 if family == "llama" else 1))


def test_group_specs_travel_as_json_and_name_their_loading_path():
    spec = GroupSpec("/models/x", dtype="bfloat16", device="cuda", tp=2, pp=2, threads=3, share_prefixes=True)
    assert GroupSpec.from_json(spec.to_json()) == spec
    assert (spec.world_size, spec.path) == (4, "torch-hybrid")
    assert [GroupSpec("m", tp=t, pp=p).path for t, p in ((1, 1), (2, 1), (1, 2))] == [
        "single",
        "transformers-tp",
        "transformers-pp",
    ]


@pytest.mark.parametrize(
    ("rows", "stages", "per_stage", "expected"),
    [
        (1, 2, 8, (1, 1)),  # one row: nothing to pipeline
        (3, 2, 8, (1, 3)),
        (100, 2, 8, (10, 10)),  # 11 steps of 10 rows beat 17 of 7 (12 filler rows) and 9 of 13
        (100, 2, 4, (13, 8)),
        (97, 2, 8, (7, 14)),
        (40, 3, 4, (4, 10)),
    ],
)
def test_pipeline_micro_batches_are_alike_and_keep_the_pipeline_busy(rows, stages, per_stage, expected):
    from evalfleet.planning.strategy import microbatches

    size, count = microbatches(rows, stages, per_stage)
    assert (size, count) == expected
    assert size * count >= rows > size * (count - 1)


def test_a_replica_token_budget_cuts_batches_into_padded_chunks():
    items = [LoglikelihoodItem((1,) * n, (2,)) for n in (9, 7, 3, 2)]  # lengths 10, 8, 4, 3
    assert first_chunk(items, None) == items
    assert first_chunk(items, 20) == items[:2]  # 2 rows x 10 tokens
    assert first_chunk(items, 5) == items[:1]  # never empty, even over budget
    assert first_chunk(items[2:], 8) == items[2:]


def test_communication_totals_add_up_across_ranks_and_batches():
    summary = CommunicationSummary()
    event = {"kind": "all_reduce", "calls": 2, "bytes": 100, "seconds": 0.5}
    summary.add_batch([{"busy_seconds": 2.0, "events": [event], "timed": True}, {"busy_seconds": 2.0, "events": [], "timed": True}])
    summary.add_batch([{"busy_seconds": 1.0, "events": [{**event, "kind": "p2p"}], "timed": True}])
    figures = summary.as_dict()
    assert (figures["bytes"], figures["calls"], figures["seconds"]) == (200, 4, 1.0)
    assert figures["share"] == pytest.approx(1.0 / 5.0)
    assert figures["by_kind"] == {
        "all_reduce": {"calls": 2, "bytes": 100, "seconds": 0.5},
        "p2p": {"calls": 2, "bytes": 100, "seconds": 0.5},
    }
    assert CommunicationSummary().as_dict()["share"] == 0.0


def test_the_timer_wraps_and_restores_torch_distributed():
    import torch
    import torch.distributed as dist

    original = dist.all_reduce
    timer = CommunicationTimer()
    timer.install()
    try:
        assert dist.all_reduce is not original
        timer.add("p2p", 64, 0.25)
        with pytest.raises(ValueError):  # no process group here: the call fails, nothing is counted
            dist.all_reduce(torch.ones(4))
    finally:
        timer.uninstall()
    assert dist.all_reduce is original
    assert timer.take() == [{"kind": "p2p", "calls": 1, "bytes": 64, "seconds": 0.25}]
    assert timer.take() == []


def test_a_later_stage_measures_its_cache_on_its_own_first_layer():
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, vocab_size=50
    )

    cache = StageCache(2, config=config)
    keys = torch.zeros(1, 1, 5, 8)
    cache.update(keys, keys, layer_idx=2)
    assert cache.get_seq_length() == 5  # layer 0 lives on another stage and stays empty
    assert cache.get_mask_sizes(1, 0) == cache.get_mask_sizes(1, 2)


def test_each_rank_sees_its_own_gpu_counted_among_the_drivers_visible_ones(monkeypatch):
    from types import SimpleNamespace

    from evalfleet.runtime.transport import WorkerGroup

    group = WorkerGroup(GroupSpec("m", tp=2, device="cuda"), ["cuda:0", "cuda:1"])
    group._store = SimpleNamespace(port=1234)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = group._environment(1, "cuda:1", None)
    assert (env["CUDA_VISIBLE_DEVICES"], env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("1", "1", "0", "2")
    assert env["EVALFLEET_STORE_PORT"] == "1234" and "EVALFLEET_DRIVER_FD" not in env
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert group._environment(1, "cuda:1", 9)["CUDA_VISIBLE_DEVICES"] == "6"
    assert group._environment(0, "cpu", 9)["CUDA_VISIBLE_DEVICES"] == ""


def test_a_group_given_its_own_visible_gpus_counts_among_those_not_the_drivers(monkeypatch):
    """A replica added on GPUs the driver does not see: env={"CUDA_VISIBLE_DEVICES": "4,5"}, cuda:0 and cuda:1."""
    from types import SimpleNamespace

    from evalfleet.runtime.transport import WorkerGroup

    group = WorkerGroup(GroupSpec("m", tp=2, device="cuda"), ["cuda:0", "cuda:1"], env={"CUDA_VISIBLE_DEVICES": "4,5"})
    group._store = SimpleNamespace(port=1234)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert [group._environment(rank, f"cuda:{rank}", None)["CUDA_VISIBLE_DEVICES"] for rank in (0, 1)] == ["4", "5"]


def test_the_planner_sees_only_the_gpus_this_job_was_given(monkeypatch):
    import torch

    from evalfleet.engines.distributed.loader import visible_inventory
    from evalfleet.planning import Inventory

    monkeypatch.setattr(Inventory, "detect", classmethod(lambda cls: Inventory.from_spec("4xA100-80GB")))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # what CUDA_VISIBLE_DEVICES leaves to torch
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert visible_inventory().num_gpus == 2
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_inventory().num_gpus == 4
