"""`evalfleet plan`: profile, inventory and plan, shown as tables for people or one JSON document."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from evalfleet.planning.backends import LABELS
from evalfleet.planning.calibration import describe_speed, plan_speeds
from evalfleet.planning.hardware import Inventory, parse_gpus
from evalfleet.planning.model_profile import profile_model
from evalfleet.planning.planner import Plan, plan
from evalfleet.types import EvalfleetError


def plan_command(
    model: str,
    gpus: str | None = None,
    *,
    dtype: str = "bfloat16",
    max_length: int = 2048,
    batch_size: int = 8,
    strategy: str = "auto",
    tp: int | None = None,
    pp: int | None = None,
    dp: int | None = None,
    as_json: bool = False,
    backend: str = "auto",
) -> Plan:
    """Plan and print; a plan that does not fit is printed too, then raised as its one-sentence reason."""
    profile = profile_model(model)
    inventory = parse_gpus(gpus or "auto")
    result = plan(
        profile,
        inventory,
        dtype=dtype,
        max_length=max_length,
        batch_size=batch_size,
        strategy=strategy,
        tp=tp,
        pp=pp,
        dp=dp,
        backend=backend,
    )
    speeds = plan_speeds(result, inventory) if result.fits else None
    if as_json:
        document = {**result.to_dict(), "gpus": inventory.describe(), "speeds": speeds}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        render(result, inventory, Console(), speeds)
    if not result.fits:
        raise EvalfleetError(result.reason)
    return result


def render(result: Plan, inventory: Inventory, console: Console, speeds: dict | None = None) -> None:
    profile, dtype = result.profile, result.dtype
    model = Table(title=f"{profile.name} ({profile.architecture})", show_header=False, box=None)
    model.add_row("parameters", f"{profile.params:,} ({profile.count_method})")
    model.add_row("per layer", f"{profile.params_per_layer:,} x {profile.num_layers} layers")
    model.add_row(
        "hidden / heads / kv heads",
        f"{profile.hidden_size} / {profile.num_heads} / {profile.num_kv_heads} (head {profile.head_dim})",
    )
    model.add_row("vocabulary / max positions", f"{profile.vocab_size:,} / {profile.max_positions or 'unbounded'}")
    model.add_row("weights", ", ".join(f"{d} {_size(b)}" for d, b in profile.weight_bytes_by_dtype().items()))
    model.add_row("KV cache per token", f"{profile.kv_bytes_per_token(dtype):,} bytes ({dtype})")
    model.add_row("devices", inventory.describe())
    console.print(model)

    layout = result.layout
    if result.fits:
        console.print(
            f"\n[green]fits[/green]: {result.strategy.value} tp={layout.tp} pp={layout.pp} dp={layout.dp}, "
            f"engine {result.engine} on {LABELS[result.backend]}, {result.gpus_used} GPU(s) on {result.nodes_used} node(s), "
            f"~{result.estimated_tokens_per_s:,.0f} tokens/s (modeled)\n{result.reason}"
        )
        if speeds:
            console.print(f"speeds for {speeds['key']}:")
            for kind, figures in speeds["by_kind"].items():
                console.print(f"  {describe_speed(kind, figures)}")
    else:
        console.print(
            f"\n[red]does not fit[/red] on {LABELS[result.backend]}: {result.reason}\n"
            f"closest layout: tp={layout.tp} pp={layout.pp}"
        )
    memory = Table(title=f"memory per {'CPU' if inventory.is_cpu_only else 'GPU'} (GB)")
    for column in ("weights", "kv cache", "activations", "overhead", "margin", "total"):
        memory.add_column(column, justify="right")
    memory.add_row(*(f"{value:.2f}" for value in result.per_gpu.to_dict().values()))
    console.print(memory)
    if result.placement:
        each = "of its one process" if result.layout.device_map else "per rank"
        console.print(f"placement (replica: node:gpu {each}): " + _placement_text(result))
    if result.alternatives:
        others = Table(title="alternatives")
        for column in ("strategy", "tp", "pp", "dp", "GPUs", "GB/GPU", "tokens/s"):
            others.add_column(column, justify="right")
        for alt in result.alternatives:
            others.add_row(
                alt.strategy.value,
                str(alt.layout.tp),
                str(alt.layout.pp),
                str(alt.layout.dp),
                str(alt.gpus_used),
                f"{alt.per_gpu.total:.1f}",
                f"{alt.estimated_tokens_per_s:,.0f}",
            )
        console.print(others)


def _placement_text(result: Plan) -> str:
    world = result.layout.world_size
    replicas = [result.placement[i : i + world] for i in range(0, len(result.placement), world)]
    return "  ".join(f"{r}: " + ",".join(f"{n}:{g}" for n, g in ranks) for r, ranks in enumerate(replicas))


def _size(nbytes: float) -> str:
    """GiB for models, MiB for the small ones that would otherwise all read 0.0 GB."""
    return f"{nbytes / 2**30:.1f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MB"
