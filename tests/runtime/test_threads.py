"""Torch's thread count follows the free cores, and OMP_NUM_THREADS overrides it."""

from __future__ import annotations

import torch

from evalfleet.runtime.threads import choose_threads, set_torch_threads


def test_a_quiet_machine_gets_every_core():
    assert choose_threads(cores=8, load=0.4) == 8
    assert choose_threads(cores=8, load=1.9) == 8  # the run queue's one may be this process


def test_busy_cores_are_left_alone():
    assert choose_threads(cores=8, load=3.5) == 6
    assert choose_threads(cores=2, load=11.0) == 1


def test_omp_num_threads_wins(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
        assert set_torch_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr("evalfleet.runtime.threads.usable_cores", lambda: 2)
        assert set_torch_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_run_started_now_gets_the_fixed_count_or_the_free_cores(monkeypatch):
    from evalfleet.runtime.threads import run_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert run_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.getloadavg", lambda: (2.5, 0.0, 0.0))
    monkeypatch.setattr("evalfleet.runtime.threads.usable_cores", lambda: 4)
    assert run_threads() == 3
