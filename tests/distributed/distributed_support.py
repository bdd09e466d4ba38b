"""Helpers shared by the distributed tests: request sets, result comparison, process checks."""

from __future__ import annotations

import random

import psutil

from evalfleet.runtime.backends.base import GenerationItem, LoglikelihoodItem
from evalfleet.runtime.batching import make_batches


def within(a: float, b: float, abs_tol: float, rel_tol: float) -> bool:
    return abs(a - b) <= abs_tol + rel_tol * abs(b)


def differences(expected: list, actual: list, abs_tol: float = 1e-4, rel_tol: float = 1e-5) -> list[str]:
    """Every result that differs between two runs, batch by batch (empty when they agree)."""
    problems = []
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        for row, (a, b) in enumerate(zip(want, got, strict=True)):
            if isinstance(a, str):
                if a != b:
                    problems.append(f"batch {index} row {row}: generated {b!r}, expected {a!r}")
            elif not within(b[0], a[0], abs_tol, rel_tol) or bool(a[1]) != bool(b[1]):
                problems.append(f"batch {index} row {row}: {b}, expected {a}")
    return problems


def run_all(runner, batches) -> list:
    """Results of every batch, in batch order, however the runner ordered its callbacks."""
    done: dict[int, list] = {}

    def on_batch_done(index: int, results: list) -> None:
        assert index not in done, f"batch {index} was reported twice"
        done[index] = results

    runner.run(batches, on_batch_done)
    assert sorted(done) == list(range(len(batches)))
    return [done[i] for i in range(len(batches))]


def make_requests(vocab: int, max_length: int, seed: int = 3) -> list[list]:
    """Log-likelihood batches (short, long, window-sized) and generation batches, left-padded by the backend."""
    rng = random.Random(seed)

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(2, vocab) for _ in range(n))

    scored = [LoglikelihoodItem(tokens(rng.randint(1, 40)), tokens(rng.randint(1, 6))) for _ in range(40)]
    scored += [LoglikelihoodItem(tokens(1), tokens(max_length - 1)) for _ in range(3)]  # rolling windows
    scored += [LoglikelihoodItem(tokens(rng.randint(60, 100)), tokens(rng.randint(1, 20))) for _ in range(5)]
    generated = [GenerationItem(tokens(rng.randint(2, 30)), ("\n", "."), rng.randint(3, 8)) for _ in range(8)]
    batches = []
    for items in (scored, generated):
        for batch in make_batches(items, token_budget=700):
            batches.append([items[i] for i in batch])
    return batches


def single_process_reference(model, seed: int = 3) -> tuple[list, list]:
    """Requests for `model` and their results from one process on one CPU thread (the lightweight
    engine's runner): what every layout must reproduce."""
    from evalfleet.runtime.backends.hf import HFBackend

    backend = HFBackend.load(str(model), dtype="float32", device="cpu")
    batches = make_requests(len(backend.tokenizer), backend.max_length, seed=seed)
    return batches, one_thread_results(backend, batches)


def one_thread_results(backend, batches) -> list:
    """`batches` computed by the lightweight engine's runner on one CPU thread; `backend` is closed after."""
    import torch

    from evalfleet.runtime.runner import InProcessRunner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_all(InProcessRunner(backend, "cpu"), batches)
    finally:
        torch.set_num_threads(threads)
        backend.close()


def alive(pids: list[int]) -> list[int]:
    """The pids among `pids` that still run (zombies count as gone)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def worker_pids_of(parent: int) -> list[int]:
    """Worker processes started by `parent` (workers run in their own sessions, not its group)."""
    try:
        children = psutil.Process(parent).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c.pid for c in children if "evalfleet.runtime.rank" in " ".join(c.cmdline())]
