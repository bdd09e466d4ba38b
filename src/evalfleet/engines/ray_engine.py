"""One evaluation on a Ray cluster: lm-eval here, the model's ranks as Ray actors on the cluster's nodes.

This process (the driver) runs lm-eval, owns the request cache and writes results.json; the
ranks only compute batches and send their results back through Ray, so the nodes share no
filesystem with it (each node needs the model's files, or a hub id). It shares the whole
evaluation path with the other engines (`run_evaluation`) and swaps only the runner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from evalfleet.engines.evaluation import load_dtype_and_device, run_evaluation
from evalfleet.engines.run import check_request
from evalfleet.runtime.backends.hf import load_tokenizer
from evalfleet.runtime.lm import ProgressCallback
from evalfleet.runtime.group import GroupSpec
from evalfleet.runtime.ray_ranks import RayGroupRunner, connect
from evalfleet.types import DistributionStrategy, EvalfleetError, EvaluationRequest, EvaluationResult, resolve_model_path

RanksCallback = Callable[[list[list[dict[str, Any]]]], None]


def ray_layout(request: EvaluationRequest) -> tuple[int, int, int]:
    """(tp, pp, dp) from the request's hints; a forced strategy without a degree gets 2, as on the CPU."""
    strategy = request.strategy
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
    check_request(request)
    connect(address)
    tp, pp, dp = ray_layout(request)
    if nodes is None:
        nodes = spread_over_nodes(cluster_gpus(), tp, pp * dp)
    dtype, device = load_dtype_and_device(request)
    model_path = resolve_model_path(request.model.path)
    spec = GroupSpec(model_path, dtype=dtype, tp=tp, pp=pp, threads=1, max_length=request.model.max_length,
                     revision=request.model.revision, trust_remote_code=request.model.trust_remote_code,
                     share_prefixes=True)
    runner = RayGroupRunner(spec, dp, nodes).start()
    try:
        if on_ranks is not None:
            on_ranks(runner.rank_nodes())
        tokenizer = load_tokenizer(model_path, request.model.revision, request.model.trust_remote_code)
        parameter_bytes = sum(runner.describe()["parameter_bytes_per_rank"])
        return run_evaluation(request, runner, tokenizer, engine="ray", dtype=dtype, device=device,
                              model_gb=round(parameter_bytes / 2**30, 6), progress=progress,
                              extra={"ray": {"address": address}})
    finally:
        runner.close()
