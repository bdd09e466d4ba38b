"""A real allocation failure on one rank of a tp=2 group: no hang, the same results, the budget stays halved.

Rank 1 runs under a memory limit (RLIMIT_DATA, set by the test-only fault injector in
tests/faults once the model is loaded), so a batch whose logits do not fit fails a real
allocation inside torch while rank 0 carries on into the next collective.

The limit is the rank's writable memory after loading plus a headroom, so what counts is how
much of that memory is free for reuse at that moment. glibc's malloc is pinned so that it is
none: a fixed mmap threshold (every tensor buffer is mapped on allocation and unmapped when
freed, instead of staying in the heap as reusable space whose size depends on what loading
happened to free) and two arenas (reserved-but-unused arenas do not eat the headroom). Without
the fixed threshold the headroom a batch really had varied by a few hundred megabytes from run
to run, and with coverage on, 8 rows sometimes fitted.
"""

from __future__ import annotations

import random

import pytest
from distributed_support import differences, run_all
from faultenv import fault_env
from tinymodels import build_tiny_model

from evalfleet.runtime.backends.base import LoglikelihoodItem
from evalfleet.runtime.group import GroupSpec
from evalfleet.runtime.workers import WorkerGroupRunner

pytestmark = pytest.mark.slow

VOCAB = 32_000  # large logits, so memory follows the batch size
CONTINUATION = 100
ROWS = 8
# Logits of one row: CONTINUATION x VOCAB float32 = 12.8 MB, a few copies at the peak (gathered
# logits, log-softmax, the scoring gather). Measured on rank 1 with the allocator pinned as
# below: 8 rows need between 180 and 260 MB, 4 rows between 120 and 180, 2 rows between 60 and
# 120. A headroom of 100 MB is twice too small for 8 rows and leaves 1 row (2 rows at best)
# room to spare, so the budget is halved two or three times, then holds.
HEADROOM_MB = 100
ALLOCATOR = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = build_tiny_model(tmp_path_factory.mktemp("oom") / "wide-llama", family="llama", max_positions=256)
    config = AutoConfig.from_pretrained(folder)
    config.vocab_size = VOCAB
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


def _batches() -> list[list[LoglikelihoodItem]]:
    rng = random.Random(5)

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(2, 300) for _ in range(n))

    # Left padding: contexts of different lengths in every batch.
    return [[LoglikelihoodItem(tokens(rng.randint(3, 20)), tokens(CONTINUATION)) for _ in range(ROWS)]
            for _ in range(3)]


def test_a_real_allocation_failure_on_one_tp_rank_halves_the_budget_for_good(wide_llama):

    from evalfleet.runtime.backends.hf import HFBackend
    from evalfleet.runtime.runner import InProcessRunner

    batches = _batches()
    backend = HFBackend.load(str(wide_llama), dtype="float32", device="cpu")
    try:
        reference = run_all(InProcessRunner(backend, "cpu"), batches)
    finally:
        backend.close()

    spec = GroupSpec(str(wide_llama), dtype="float32", device="cpu", tp=2, threads=1)
    runner = WorkerGroupRunner(spec, [["cpu", "cpu"]], batch_timeout=600, max_restarts=0,
                               env={**fault_env(f"rlimit:1:{HEADROOM_MB}"), **ALLOCATOR}).start()
    try:
        results = run_all(runner, batches)
        description = runner.describe()
        (replica,) = runner.replicas
    finally:
        runner.close()
    assert not differences(reference, results)
    # The group learned of the failure from the rank's exit, not from a timeout, and restarted
    # once per halving; the budget never went back up, so later batches did not fail again.
    assert description["oom_restarts"] >= 1 and description["oom_halvings"] == description["oom_restarts"]
    # Every failure was the first batch's: once halved, the budget held for the batches after it.
    assert all(f.startswith("rank 1 of replica-0 ran out of memory while batch 0") for f in replica.failures), \
        replica.failures
    (budget,) = description["token_budgets"]
    assert budget is not None and budget < ROWS * (20 + CONTINUATION)


def test_without_the_limit_the_same_batches_never_run_out_of_memory(wide_llama):
    """The converse: the failure above comes from the limit, not from the batches."""
    spec = GroupSpec(str(wide_llama), dtype="float32", device="cpu", tp=2, threads=1)
    runner = WorkerGroupRunner(spec, [["cpu", "cpu"]], env=ALLOCATOR).start()
    try:
        run_all(runner, _batches()[:1])
        assert runner.describe()["oom_restarts"] == 0 and runner.describe()["token_budgets"] == [None]
    finally:
        runner.close()
