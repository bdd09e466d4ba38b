"""Run each job as an `evalfleet worker` process on this machine.

A job on GPUs sees only its own through `CUDA_VISIBLE_DEVICES`; a job on a CPU slot
sees no GPU at all and gets its share of the cores, so N slots run N jobs side by side
instead of N jobs each fighting for every core.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from evalfleet.orchestrator.executors.process import SubprocessExecutor
from evalfleet.orchestrator.store import Device, JobRecord
from evalfleet.planning import Inventory
from evalfleet.types import UsageError

THREADS_VARIABLE = "EVALFLEET_THREADS"
# Every worker's: no tokenizer thread pools or progress bars of its own, output unbuffered into its log.
QUIET = {"TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def worker_command(job_id: str, db_path: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "evalfleet.cli", "worker", "--job", job_id, "--db", str(db_path)]


class LocalExecutor(SubprocessExecutor):
    """`evalfleet worker --job ID --db PATH` per job; logs go to `<store folder>/logs`."""

    name = "local"
    self_reporting = True

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        inventory: Inventory,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        grace_s: float = 10.0,
        cores: int | None = None,
        standby: bool = False,
    ) -> None:
        if len(inventory.nodes) != 1:
            raise UsageError(
                f"the local executor runs jobs on this machine only, but the pool has {len(inventory.nodes)} nodes"
            )
        db = Path(db_path).expanduser().resolve()
        self.cpu_slots = inventory.is_cpu_only
        self.pool_size = len(inventory.nodes[0].gpus)
        self.cores = cores or os.cpu_count() or 1
        super().__init__(
            lambda job, placement: worker_command(job.id, db),
            log_dir=log_dir or db.parent / "logs",
            env=env,
            set_visible_devices=not self.cpu_slots,
            grace_s=grace_s,
            standby=standby,
        )

    def threads_for(self, devices: int) -> int:
        """A job's share of the CPU cores: in proportion to its share of the pool, at least one."""
        return max(1, self.cores * devices // self.pool_size)

    def replica_env(self, devices: Sequence[Device]) -> dict[str, str]:
        visible = "" if self.cpu_slots else ",".join(str(gpu) for _, gpu in devices)
        return {THREADS_VARIABLE: str(self.threads_for(len(devices))), "CUDA_VISIBLE_DEVICES": visible}

    def standby_env(self) -> dict[str, str]:
        env = {**super().standby_env(), **QUIET}
        if self.cpu_slots:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def job_env(self, job: JobRecord, placement: Sequence[Device]) -> dict[str, str]:
        env = super().job_env(job, placement)
        threads = str(self.threads_for(len(placement)))
        env.update({THREADS_VARIABLE: threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **QUIET})
        if self.cpu_slots:  # a slot is CPU work, even on a machine that has GPUs
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env
