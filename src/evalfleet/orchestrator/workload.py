"""Seeded synthetic evaluation workloads for the simulator: who arrives when, asking for what.

Model sizes run from 1B to 180B (real configs: the planner's shipped ones plus two small
Llama-3.2-shaped configs), each job sized by the planner on the simulated cluster, so a
job's speed on any number of GPUs is the planner's estimate for that layout, calibrated by
measured runs of the same key as a submitted job's is (`demand.plan_demand`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from evalfleet.orchestrator.demand import JobDemand
from evalfleet.orchestrator.demand import plan_demand
from evalfleet.planning import Inventory, plan, profile_model


def _llama(hidden: int, layers: int, heads: int, intermediate: int, name: str) -> dict:
    return {
        "_name_or_path": name, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": 8, "intermediate_size": intermediate, "vocab_size": 128256,
        "max_position_embeddings": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    }


# (model, relative frequency): small models are evaluated far more often than the giants.
MODEL_MIX: tuple[tuple[str | dict, float], ...] = (
    (_llama(2048, 16, 32, 8192, "sim/llama-1b"), 0.14),
    (_llama(3072, 28, 24, 8192, "sim/llama-3b"), 0.12),
    ("meta-llama/Llama-2-7b-hf", 0.12),
    ("mistralai/Mistral-7B-v0.1", 0.08),
    ("meta-llama/Llama-3.1-8B", 0.14),
    ("meta-llama/Llama-2-13b-hf", 0.09),
    ("EleutherAI/gpt-neox-20b", 0.04),
    ("facebook/opt-30b", 0.04),
    ("tiiuae/falcon-40b", 0.04),
    ("mistralai/Mixtral-8x7B-v0.1", 0.04),
    ("meta-llama/Llama-3.1-70B", 0.07),
    ("Qwen/Qwen2-72B", 0.04),
    ("facebook/opt-175b", 0.02),
    ("tiiuae/falcon-180B", 0.02),
)
PRIORITY_MIX = (("high", 0.15), ("normal", 0.6), ("low", 0.25))


@dataclass(frozen=True)
class TraceJob:
    id: str
    arrival: float
    priority: str
    demand: JobDemand
    """What the scheduler is told: the planner's speeds and the estimated work."""
    true_work_tokens: float
    """What the job really computes; estimates are off by a seeded factor."""
    failures: tuple[float, ...] = ()
    """For each failing attempt in turn, the fraction of its compute after which it crashes."""


def model_demands(inventory: Inventory) -> list[tuple[JobDemand, float]]:
    """Each model of `MODEL_MIX` sized by the planner on `inventory` (work left at zero)."""
    sized = []
    for source, weight in MODEL_MIX:
        profile = profile_model(source)
        answer = plan(profile, inventory, backend="any")  # a synthetic fleet: every backend is assumed
        if answer.fits:
            sized.append((plan_demand(answer, inventory, work_tokens=0.0, model=profile.name), weight))
    return sized


def synthetic_trace(
    inventory: Inventory,
    *,
    jobs: int = 500,
    seed: int = 0,
    arrival_window_s: float = 4 * 3600.0,
    work_tokens: tuple[float, float] = (3e6, 3e8),
    estimate_error: float = 0.15,
    failure_rate: float = 0.03,
) -> list[TraceJob]:
    """`jobs` Poisson arrivals over `arrival_window_s`; work log-uniform within `work_tokens`.

    Each attempt fails with probability `failure_rate` (at a uniform point of its compute);
    the true work differs from the estimate by a log-normal factor of spread `estimate_error`.
    """
    rng = random.Random(seed)
    models = model_demands(inventory)
    rate = jobs / arrival_window_s
    arrival, trace = 0.0, []
    for index in range(jobs):
        demand = rng.choices([m for m, _ in models], weights=[w for _, w in models])[0]
        priority = rng.choices([p for p, _ in PRIORITY_MIX], weights=[w for _, w in PRIORITY_MIX])[0]
        work = math.exp(rng.uniform(math.log(work_tokens[0]), math.log(work_tokens[1])))
        failures = []
        while rng.random() < failure_rate:
            failures.append(rng.random())
        trace.append(TraceJob(
            id=f"job{index:04d}", arrival=round(arrival, 3), priority=priority, demand=demand.with_work(work),
            true_work_tokens=work * math.exp(rng.gauss(0.0, estimate_error)), failures=tuple(failures),
        ))
        arrival += rng.expovariate(rate)
    return trace
