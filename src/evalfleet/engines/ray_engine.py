"""One evaluation on a Ray cluster: lm-eval here, the model's ranks as Ray actors on the cluster's nodes.

This process (the driver) runs lm-eval, owns the request cache and writes results.json; the
ranks only compute batches and send their results back through Ray, so the nodes share no
filesystem with it (each node needs the model's files, or a hub id). It shares the whole
evaluation path with the other engines (`run_evaluation`) and swaps only the runner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from evalfleet.engines.distributed.vllm_layout import vllm_spec_fields
from evalfleet.engines.evaluation import run_evaluation
from evalfleet.engines.run import check_request, note_start
from evalfleet.runtime.backends.hf import load_tokenizer
from evalfleet.runtime.lm import ProgressCallback
from evalfleet.runtime.group import GroupSpec
from evalfleet.runtime.ray_ranks import RayGroupRunner, connect
from evalfleet.types import (
    DistributionStrategy,
    EvalfleetError,
    EvaluationRequest,
    EvaluationResult,
    UsageError,
    resolve_model_path,
)

RanksCallback = Callable[[list[list[dict[str, Any]]]], None]


def ray_layout(request: EvaluationRequest) -> tuple[int, int, int]:
    """(tp, pp, dp) from the request's hints; a forced strategy without a degree gets 2, as on the CPU."""
    strategy = request.strategy
    if strategy is DistributionStrategy.DEVICE_MAP:
        raise EvalfleetError("the device_map layout runs on this machine's GPUs, not on Ray; run without --ray, "
                             "or use --strategy tp, pp or dp")
    tp, pp, dp = request.tp, request.pp, request.dp
    if strategy in (DistributionStrategy.TENSOR_PARALLEL, DistributionStrategy.HYBRID):
        tp = tp or 2
    if strategy in (DistributionStrategy.PIPELINE_PARALLEL, DistributionStrategy.HYBRID):
        pp = pp or 2
    if strategy is DistributionStrategy.DATA_PARALLEL:
        dp = dp or 2
    return tp or 1, pp or 1, dp or 1


def spread_over_nodes(free: dict[str, int], tp: int, groups: int) -> list[str]:
    """A node per rank: each tp group inside one node, each group on the node with the most GPUs left.

    Spreading stages and replicas over the nodes is what a multi-node run is for (more memory,
    more devices); a tp group never leaves its node, as its all-reduces need the fast links.
    """
    left = dict(free)
    nodes: list[str] = []
    for _ in range(groups):
        node = max(sorted(left), key=lambda name: left[name], default=None)
        if node is None or left[node] < tp:
            raise EvalfleetError(f"the Ray cluster has no node with {tp} free GPU(s) for group {len(nodes) // tp + 1} "
                                 f"of {groups} (GPUs per node: {free})")
        left[node] -= tp
        nodes += [node] * tp
    return nodes


def nodes_have_gpus(nodes: Sequence[str]) -> bool:
    """Whether these nodes' GPUs are real: Ray names the type of the GPUs it detects, never of declared ones."""
    import ray

    detected = {node["NodeID"] for node in ray.nodes()
                if any(key.startswith("accelerator_type:") for key in node["Resources"])}
    return bool(nodes) and set(nodes) <= detected


def ranks_backend(request: EvaluationRequest, tp: int, pp: int, nodes: Sequence[str]) -> str | None:
    """The backend the ranks run, decided on the nodes they may use: vLLM must be installed there, not here.

    `auto` is vLLM on real GPUs where every node has it; `vllm` that vLLM cannot run is refused in one
    sentence, never run with transformers. None for `hf` (and for a name `check_request` refuses).
    """
    from evalfleet.planning import profile_model
    from evalfleet.runtime.ray_vllm import refusal, vllm_on_nodes

    if request.backend not in ("auto", "vllm"):
        return None
    on_gpu = nodes_have_gpus(nodes)
    if request.backend == "auto" and not on_gpu:
        return "hf"
    profile = profile_model(request.model.path)
    answers = vllm_on_nodes(nodes, {"family": profile.family, "architecture": profile.architecture, "tp": tp, "pp": pp,
                                    "head_dim": profile.head_dim, "on_cpu": not on_gpu})
    if request.backend == "auto" and any(answer["python"] is None for answer in answers):
        return "hf"
    problem = refusal(answers)
    if problem:
        raise UsageError(problem)
    return "vllm"


def cluster_gpus() -> dict[str, int]:
    """GPUs per live node of the connected cluster, by node id."""
    import ray

    return {node["NodeID"]: int(node["Resources"].get("GPU", 0)) for node in ray.nodes()
            if node["Alive"] and node["Resources"].get("GPU", 0) >= 1}


def evaluate_on_ray(
    request: EvaluationRequest,
    address: str,
    nodes: Sequence[str] | None = None,
    *,
    progress: ProgressCallback | None = None,
    on_ranks: RanksCallback | None = None,
) -> EvaluationResult:
    """Evaluate `request` with its ranks on the cluster at `address`.

    `nodes` pins each rank (dp-major, then stage, then tp rank) to a node id, as the scheduler
    placed it; without it, groups spread over the live nodes (`spread_over_nodes`).
    """
    note_start()
    connect(address)
    tp, pp, dp = ray_layout(request)
    request = check_request(request, ranks_backend(request, tp, pp, nodes or list(cluster_gpus())), local=False)
    backend = request.backend
    if nodes is None:  # a vLLM replica is one engine on one node; transformers keeps only tp groups together
        nodes = spread_over_nodes(cluster_gpus(), tp * pp, dp) if backend == "vllm" else \
            spread_over_nodes(cluster_gpus(), tp, pp * dp)
    model_path = resolve_model_path(request.model.path)
    # The device and dtype as asked: each rank decides them on its own node (`GroupSpec.on_this_device`).
    spec = GroupSpec(model_path, dtype=request.model.dtype, device=request.model.device, tp=tp, pp=pp, threads=1,
                     max_length=request.model.max_length,
                     revision=request.model.revision, trust_remote_code=request.model.trust_remote_code,
                     share_prefixes=backend == "hf", backend=backend)
    if backend == "vllm":
        spec = dataclasses.replace(spec, **vllm_spec_fields(request.model, tp, pp, None, None, request.seed[2] or 0))
    runner = RayGroupRunner(spec, dp, nodes).start()
    try:
        if on_ranks is not None:
            on_ranks(runner.rank_nodes())
        tokenizer = load_tokenizer(model_path, request.model.revision, request.model.trust_remote_code)
        layout = runner.describe()  # what the ranks loaded, in the dtype they decided
        parameter_bytes = sum(layout["parameter_bytes_per_rank"])
        return run_evaluation(request, runner, tokenizer, engine="ray", dtype=layout["dtype"],
                              device=layout["devices"][0],
                              model_gb=round(parameter_bytes / 2**30, 6), progress=progress,
                              extra={"ray": {"address": address}}, backend=backend)
    finally:
        runner.close()
