"""Worker groups against one process: same numbers for every layout, real splits, faults survived.

CPU over gloo, one thread per rank. Each layout's group is started once for the module.
"""

from __future__ import annotations

import os
import signal

import pytest
from distributed_support import alive, differences, one_thread_results, run_all, single_process_reference, worker_pids_of
from faultenv import fault_env

from evalfleet.runtime.backends.base import LoglikelihoodItem
from evalfleet.runtime.group import GroupSpec
from evalfleet.runtime.workers import WorkerGroupRunner
from evalfleet.types import EvalfleetError

pytestmark = pytest.mark.slow

# The project's tolerance for tensor parallelism (sums in another order); pipeline and data
# parallelism run the very same kernels on the same shapes, so they must match much closer.
TOLERANCE = {"tp": (1e-4, 1e-5), "hybrid": (1e-4, 1e-5), "pp": (1e-6, 1e-7), "dp": (1e-6, 1e-7)}
LAYOUTS = {"tp": (2, 1, 1), "pp": (1, 2, 1), "hybrid": (2, 2, 1), "dp": (1, 1, 2)}


def start_runner(model, tp=1, pp=1, dp=1, **kwargs) -> WorkerGroupRunner:
    spec = GroupSpec(str(model), dtype="float32", device="cpu", tp=tp, pp=pp, threads=1)
    return WorkerGroupRunner(spec, [["cpu"] * (tp * pp)] * dp, **kwargs).start()


@pytest.fixture(scope="module")
def runners(llama):
    """One started runner per layout, made on first use and closed at the end of the module."""
    started: dict[str, WorkerGroupRunner] = {}
    events: list[tuple] = []

    def get(name: str) -> WorkerGroupRunner:
        if name not in started:
            tp, pp, dp = LAYOUTS[name]
            started[name] = start_runner(llama, tp, pp, dp, on_communication=lambda *event: events.append(event))
        return started[name]

    get.events = events
    yield get
    for runner in started.values():
        runner.close()


@pytest.mark.parametrize("layout", ["tp", "pp", "dp", "hybrid"])
def test_every_layout_gives_the_single_process_results(layout, runners, requests_and_reference):
    batches, reference = requests_and_reference
    runner = runners(layout)
    problems = differences(reference, run_all(runner, batches), *TOLERANCE[layout])
    assert not problems, "\n".join(problems[:10])
    description = runner.describe()
    assert (description["tp"], description["pp"], description["dp"]) == LAYOUTS[layout]
    assert description["strategy"] == layout


def test_three_micro_batched_pipeline_stages_give_the_single_process_results(tmp_path):
    """pp=3 on a 3-layer Llama: log-likelihoods (left-padded, several lengths), rolling windows
    and generation equal one process; every rank holds one layer."""
    from tinymodels import build_tiny_model

    model = build_tiny_model(tmp_path / "llama-3", family="llama", layers=3, seed=11)
    batches, reference = single_process_reference(model, seed=5)
    runner = start_runner(model, pp=3)
    try:
        problems = differences(reference, run_all(runner, batches), *TOLERANCE["pp"])
        ranks = runner.info["ranks"]
    finally:
        runner.close()
    assert not problems, "\n".join(problems[:10])
    assert [r["stage"] for r in ranks] == [0, 1, 2]
    for rank in ranks:
        held = {name.split(".")[2] for name in rank["shapes"] if name.startswith("model.layers.")}
        assert held == {str(rank["stage"])}


def test_tensor_parallel_ranks_hold_half_of_each_sharded_weight(runners):
    ranks = runners("tp").info["ranks"]
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    full = ranks[0]["parameters_of_full_tensors"]
    for rank in ranks:
        shapes = rank["shapes"]
        assert shapes["model.layers.0.self_attn.q_proj.weight"] == [24, 48]  # 48 output features, split in 2
        assert shapes["model.layers.1.mlp.down_proj.weight"] == [48, 48]  # 96 input features, split in 2
        assert shapes["model.layers.0.input_layernorm.weight"] == [48]  # norms are replicated
        assert rank["parameters"] < 0.6 * full


def test_pipeline_stages_hold_disjoint_layers_that_add_up_to_the_model(runners, llama):
    import torch
    from transformers import AutoModelForCausalLM

    whole = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).parameters())
    first, last = runners("pp").info["ranks"]
    assert (first["stage"], last["stage"]) == (0, 1)
    assert any(n.startswith("model.layers.0.") for n in first["shapes"])
    assert not any(n.startswith("model.layers.1.") for n in first["shapes"])
    assert not any(n.startswith("model.layers.0.") for n in last["shapes"])
    assert "lm_head.weight" in last["shapes"] and "lm_head.weight" not in first["shapes"]
    assert first["parameters"] + last["parameters"] == whole


def test_hybrid_ranks_shard_their_own_stage_only(runners):
    ranks = runners("hybrid").info["ranks"]
    assert [(r["stage"], r["tp_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for rank in ranks:
        layer = f"model.layers.{rank['stage']}."
        other = f"model.layers.{1 - rank['stage']}."
        assert rank["shapes"][layer + "self_attn.q_proj.weight"] == [24, 48]
        assert not any(name.startswith(other) for name in rank["shapes"])


def test_communication_is_timed_and_reported(runners, requests_and_reference):
    runner = runners("tp")
    runner.time_every = 1
    try:
        run_all(runner, requests_and_reference[0][:2])
    finally:
        runner.time_every = 20
    kinds = {event[0] for event in runners.events}
    assert "all_reduce" in kinds
    assert all(nbytes >= 0 and seconds >= 0 and devices == ["cpu"] for _, nbytes, seconds, devices in runners.events)
    summary = runner.describe()["communication"]
    assert summary["bytes"] > 0 and summary["calls"] > 0
    assert 0 < summary["share"] <= 1
    assert summary["by_kind"]["all_reduce"]["calls"] > 0


def test_communication_is_timed_on_one_batch_in_n(llama, requests_and_reference):
    batches, _ = requests_and_reference
    batches = (batches * 2)[:7]
    events: list[tuple] = []
    runner = start_runner(llama, tp=2, time_every=3, on_communication=lambda *event: events.append(event))
    try:
        run_all(runner, batches)
        summary = runner.describe()["communication"]
    finally:
        runner.close()
    assert (summary["batches"], summary["timed_batches"], summary["sample_every"]) == (7, 3, 3)  # batches 0, 3, 6
    assert summary["calls"] > 0 and 0 < summary["share"] <= 1
    assert events


def test_a_killed_rank_is_restarted_and_the_results_do_not_change(runners, requests_and_reference):
    batches, reference = requests_and_reference
    runner = runners("tp")
    before = runner.describe()["restarts"]
    victim = runner.worker_pids()[0][1]
    done: dict[int, list] = {}

    def on_batch_done(index, results):
        if len(done) == 1:
            os.kill(victim, signal.SIGKILL)
        done[index] = results

    runner.run(batches, on_batch_done)
    assert not differences(reference, [done[i] for i in range(len(batches))])
    assert runner.describe()["restarts"] == before + 1
    assert victim not in runner.worker_pids()[0]
    assert not alive([victim])


def test_a_hung_rank_times_out_and_its_replica_restarts(runners, requests_and_reference):
    batches, reference = requests_and_reference
    runner = runners("pp")
    before = runner.describe()["restarts"]
    stuck = runner.worker_pids()[0][1]
    os.kill(stuck, signal.SIGSTOP)
    runner.batch_timeout = 3.0
    try:
        results = run_all(runner, batches[:3])
    finally:
        runner.batch_timeout = 900.0
    assert not differences(reference[:3], results, *TOLERANCE["pp"])
    assert runner.describe()["restarts"] == before + 1
    assert not alive([stuck])


def test_the_fault_injectors_make_the_equality_check_fail(llama, requests_and_reference):
    """Proof that the equality tests can fail: a swapped TP shard, a missing PP mask or PP
    micro-batches merged out of order is caught."""
    batches, reference = requests_and_reference
    padded = [i for i, batch in enumerate(batches) if len({item.length for item in batch}) > 1][:3]
    for layout, fault in (("tp", "swap_tp_shards"), ("pp", "drop_pp_mask"), ("pp", "rotate_pp_microbatches")):
        tp, pp, _ = LAYOUTS[layout]
        runner = start_runner(llama, tp, pp, env=fault_env(fault))
        try:
            results = run_all(runner, [batches[i] for i in padded])
            problems = differences([reference[i] for i in padded], results, *TOLERANCE[layout])
        finally:
            runner.close()
        assert problems, f"{fault} went unnoticed"


def test_out_of_memory_halves_the_token_budget_and_gives_the_same_results(llama, requests_and_reference):
    batches, reference = requests_and_reference
    runner = start_runner(llama, env=fault_env("oom_above:300"))
    try:
        # Smaller batches pad differently: equal within the project's tolerance, not bit for bit.
        assert not differences(reference, run_all(runner, batches))
        assert runner.describe()["oom_halvings"] >= 1
        too_long = [[LoglikelihoodItem((5,) * 400, (6,))]]
        with pytest.raises(EvalfleetError, match="does not fit in memory"):
            run_all(runner, too_long)
    finally:
        runner.close()


def test_workers_are_gone_after_close_and_after_a_failed_start(llama, tmp_path):
    runner = start_runner(llama, dp=2)
    pids = [pid for group in runner.worker_pids() for pid in group]
    assert len(alive(pids)) == 2
    runner.close()
    runner.close()
    assert not alive(pids)

    broken = tmp_path / "broken"
    broken.mkdir()
    for path in llama.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    before = set(worker_pids_of(os.getpid()))
    with pytest.raises(EvalfleetError, match="failed while loading the model"):
        start_runner(broken, dp=2)
    assert set(worker_pids_of(os.getpid())) <= before


def test_every_replica_lost_is_an_error_not_a_hang(llama, requests_and_reference):
    batches, _ = requests_and_reference
    runner = start_runner(llama, max_restarts=0)
    try:
        pid = runner.worker_pids()[0][0]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EvalfleetError, match="every replica failed"):
            run_all(runner, batches)
        with pytest.raises(EvalfleetError, match="no replica left"):
            run_all(runner, batches)
    finally:
        runner.close()
    assert not alive([pid])


def test_workers_die_with_a_driver_killed_by_sigkill(llama):
    """No atexit runs after SIGKILL: the workers' own parent watch must end them."""
    import subprocess
    import sys
    import time

    script = (
        "import sys\n"
        "from evalfleet.runtime.group import GroupSpec\n"
        "from evalfleet.runtime.workers import WorkerGroupRunner\n"
        "runner = WorkerGroupRunner(GroupSpec(sys.argv[1]), [['cpu']]).start()\n"
        "print(*runner.worker_pids()[0], flush=True)\n"
        "sys.stdin.read()\n"
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", script, str(llama)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        pids = [int(pid) for pid in driver.stdout.readline().split()]
        assert len(alive(pids)) == 1
        driver.kill()
        driver.wait(timeout=30)
        deadline = time.monotonic() + 10
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pids)
    finally:
        if driver.poll() is None:
            driver.kill()


def test_a_vllm_group_gets_its_generation_batches_merged(monkeypatch):
    """vLLM schedules its own batch: consecutive generation batches go to a replica as one call,
    at least two calls per replica and at most SCHEDULED_ROWS requests a call, never splitting a
    batch; an hf group, or log-likelihood batches, go one by one."""
    from evalfleet.runtime import workers
    from evalfleet.runtime.backends.base import GenerationItem

    def batches(*sizes):
        return [[GenerationItem((1, 2, n), ("\n",), 4) for n in range(size)] for size in sizes]

    vllm = WorkerGroupRunner(GroupSpec("model", backend="vllm"), [["cpu"]])  # not started: one replica counts
    assert vllm._merged_spans(batches(5, 1, 5, 3)) == [(0, 2), (2, 3), (3, 4)]  # at most 14 / 2 rows a call
    assert vllm._merged_spans(batches(2, 2, 2, 2, 2, 2, 2, 2)) == [(0, 4), (4, 8)]
    monkeypatch.setattr(workers, "SCHEDULED_ROWS", 3)
    assert vllm._merged_spans(batches(1, 1, 1, 5, 1)) == [(0, 3), (3, 4), (4, 5)]
    monkeypatch.setattr(workers, "SCHEDULED_ROWS", 1024)
    two = WorkerGroupRunner(GroupSpec("model", backend="vllm"), [["cpu"], ["cpu"]])
    for replica in two.replicas:  # two live replicas (a group object stands for a started one)
        monkeypatch.setattr(replica, "group", object())
    assert two._merged_spans(batches(2, 2, 2, 2, 2, 2, 2, 2)) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert WorkerGroupRunner(GroupSpec("model"), [["cpu"]])._merged_spans(batches(2, 2)) is None
    assert vllm._merged_spans([[LoglikelihoodItem((1,), (2,))]] * 3) is None



def generations(llama, seed: int, batches: int, size: int, prefix: int = 0) -> tuple[list, list]:
    """Generation batches (random contexts after a `prefix` every row shares, mixed token limits,
    two stop strings) and their texts from one process on one thread, each prompt computed whole."""
    import random

    from evalfleet.runtime.backends.base import GenerationItem
    from evalfleet.runtime.backends.hf import HFBackend

    rng = random.Random(seed)
    backend = HFBackend.load(str(llama), dtype="float32", device="cpu")
    backend.reuse_prefixes = False
    vocab = len(backend.tokenizer)
    shared = tuple(rng.randrange(2, vocab) for _ in range(prefix))
    made = [[GenerationItem(shared + tuple(rng.randrange(2, vocab) for _ in range(rng.randint(1 if prefix else 2, 30))),
                            ("\n", "."), rng.randint(1, 12)) for _ in range(size)] for _ in range(batches)]
    if prefix:
        made[0].append(GenerationItem(shared, ("\n",), 6))  # a prompt that is the shared prefix alone
    return made, one_thread_results(backend, made)


def decode_counts(runner) -> tuple[int, int]:
    """The runner's replicas' decode steps and decoded rows so far."""
    return tuple(sum(column) for column in zip(*(replica.decode for replica in runner.replicas), strict=True))


def test_dp_replicas_decode_merged_generation_batches_as_one_stream(llama):
    """An hf replica that batches continuously gets consecutive generation batches in one call and
    decodes them as one stream, their shared few-shot prefix held once: rows of later batches take
    the places of rows that stopped, at most the run's batch size at once; the texts are those of
    whole prompts in one process."""
    batches, reference = generations(llama, seed=5, batches=12, size=2, prefix=24)
    spec = GroupSpec(str(llama), dtype="float32", device="cpu", threads=1, share_prefixes=True)
    runner = WorkerGroupRunner(spec, [["cpu"], ["cpu"]]).start()
    runner.generation_rows = 3
    try:
        assert run_all(runner, batches) == reference
        calls, (steps, rows) = sum(replica.requests for replica in runner.replicas), decode_counts(runner)
    finally:
        runner.close()
    # 25 rows over two replicas: calls of at most 7 rows (whole batches), two per replica
    assert calls == 4
    assert 2 < rows / steps <= 3, rows / steps  # more than one batch's rows at a time, never more than the batch size


def test_a_stream_out_of_memory_mid_decode_goes_on_in_its_replica(llama, tmp_path):
    """A dp replica's stream that runs out of memory halves its budget and goes on with the rows not
    yet done, inside the rank: the call is answered once, nothing is resent, the texts stay, and the
    halving reaches the driver's count."""
    batches, reference = generations(llama, seed=5, batches=12, size=2, prefix=24)
    marker = tmp_path / "oom-once"
    spec = GroupSpec(str(llama), dtype="float32", device="cpu", threads=1, share_prefixes=True)
    runner = WorkerGroupRunner(spec, [["cpu"], ["cpu"]], env=fault_env(f"oom_in_decode_once:{marker}")).start()
    runner.generation_rows = 3
    try:
        assert run_all(runner, batches) == reference
        calls = sum(replica.requests for replica in runner.replicas)
        description = runner.describe()
    finally:
        runner.close()
    assert marker.exists()  # the fault fired
    assert calls == 4 and description["oom_halvings"] == 1 and description["restarts"] == 0


@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_split_ranks_decode_in_step_with_the_shared_prefix_held_once(layout, llama):
    """tp ranks and pp stages run the continuous decode loop in step (tp gathers the logits on every
    rank, pp broadcasts the last stage's), the batch's shared few-shot prefix computed once (a pp
    stage's cache holding its own layers): the texts are those of whole prompts in one process,
    the prompt that is the prefix alone included."""
    tp, pp, _ = LAYOUTS[layout]
    batches, reference = generations(llama, seed=7, batches=3, size=5, prefix=40)
    spec = GroupSpec(str(llama), dtype="float32", device="cpu", tp=tp, pp=pp, threads=1, share_prefixes=True)
    runner = WorkerGroupRunner(spec, [["cpu", "cpu"]]).start()
    try:
        assert run_all(runner, batches) == reference
        steps, rows = decode_counts(runner)
    finally:
        runner.close()
    assert steps and rows / steps > 1  # the decode loop ran (not `generate`), several rows a step
