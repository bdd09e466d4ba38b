"""Measured speeds: what finished runs really did, and estimates that use them.

Every finished evaluation records, per kind of work, the tokens its runner computed and the
seconds it took ("loglikelihood": scored prompts and rolling windows; "generation": prompt
plus generation budget, the units a job's counted size uses). A record is kept under the
model's shape, the backend, the dtype, the layout (tp, pp, dp) and the hardware (a GPU model,
or the CPU threads the run used), in a SQLite file: `$EVALFLEET_CALIBRATION`, else
`calibration.sqlite` in the user cache folder.

An estimate for the same key uses the measured speed (the last `RECENT_RUNS` runs, their
tokens over their seconds) and says so (`source: measured`); without one it uses the cost
model (`strategy.replica_speeds`: prefill for prompts, decode for the generation budget) and
says `modeled`. Both figures are kept, so the model's error against
the measurement is always visible. Torch-free: `evalfleet plan` reads it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalfleet.planning.strategy import replica_speeds

KINDS = ("loglikelihood", "generation")
RECENT_RUNS = 5
# A kind computed for less than this is not recorded: start-up noise would dominate its speed.
MIN_SECONDS = 0.05

_SCHEMA = """
CREATE TABLE IF NOT EXISTS measurements (
    shape TEXT NOT NULL, backend TEXT NOT NULL, dtype TEXT NOT NULL,
    tp INTEGER NOT NULL, pp INTEGER NOT NULL, dp INTEGER NOT NULL, hardware TEXT NOT NULL,
    kind TEXT NOT NULL, tokens INTEGER NOT NULL, seconds REAL NOT NULL,
    model TEXT, recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS by_key ON measurements (shape, backend, dtype, tp, pp, dp, hardware, kind);
"""


@dataclass(frozen=True)
class CalibrationKey:
    """What a measured speed holds for: same model shape, backend, dtype, layout and hardware."""

    shape: str
    backend: str
    dtype: str
    tp: int
    pp: int
    dp: int
    hardware: str

    def describe(self) -> str:
        return f"{self.shape}, {self.backend} {self.dtype}, tp={self.tp} pp={self.pp} dp={self.dp} on {self.hardware}"


def model_shape(profile: Any) -> str:
    """The figures that set a model's speed (two checkpoints of one architecture share it)."""
    return (
        f"{profile.architecture} h{profile.hidden_size} l{profile.num_layers} a{profile.num_heads}/{profile.num_kv_heads}"
        f" f{profile.intermediate_size} v{profile.vocab_size}"
    )


def cpu_hardware(threads: int) -> str:
    return f"cpu x{max(1, int(threads))}"


def gpu_hardware(name: str) -> str:
    """A GPU by the planner's name for it (`H100`, `A100-80GB`), so plans and runs agree."""
    from evalfleet.planning.hardware import find_spec

    spec = find_spec(name, None)
    return spec.name if spec is not None else name


def slot_threads(inventory: Any) -> int:
    """The CPU threads one job of a CPU pool gets: the cores over its slots."""
    return max(1, (os.cpu_count() or 1) // max(1, inventory.device_count))


def inventory_hardware(inventory: Any) -> str:
    """The hardware key of a pool: its first GPU's model, or the CPU threads one job gets."""
    if inventory.is_cpu_only:
        return cpu_hardware(slot_threads(inventory))
    return gpu_hardware(inventory.nodes[0].gpus[0].spec.name)


def modeled_rates(profile: Any, tp: int, pp: int, dp: int, *, tflops: float, bandwidth_gbps: float,
                  link_gbps: float, dtype: str, max_length: int, batch_size: int,
                  device_map: bool = False) -> dict[str, float]:
    """The cost model's prompt ("prefill") and generated-token ("decode") speeds of dp replicas."""
    figures = {"tflops": tflops, "memory_bandwidth_gbps": bandwidth_gbps, "intra_gbps": link_gbps,
               "stage_link_gbps": link_gbps, "dtype": dtype, "max_length": max_length, "batch_size": batch_size,
               "device_map": device_map}
    prefill, decode = replica_speeds(profile, tp, pp, **figures)
    return {"prefill": dp * prefill, "decode": dp * decode}


def calibration_path() -> Path:
    explicit = os.environ.get("EVALFLEET_CALIBRATION")
    if explicit:
        return Path(explicit)
    import platformdirs

    return Path(platformdirs.user_cache_dir("evalfleet")) / "calibration.sqlite"


@dataclass(frozen=True)
class Measured:
    tokens_per_s: float
    runs: int
    tokens: int


class Calibration:
    """The measurements file (created on first write; reading a missing one finds nothing)."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else calibration_path()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30)
        connection.executescript(_SCHEMA)
        return connection

    def record(self, key: CalibrationKey, kind: str, tokens: int, seconds: float, model: str | None = None) -> bool:
        """Keep one run's figures for `kind`; a run too short to measure is skipped (False)."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind of work '{kind}'")
        if seconds < MIN_SECONDS or tokens <= 0:
            return False
        with self._connect() as connection:
            connection.execute(
                "INSERT INTO measurements VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key.shape, key.backend, key.dtype, key.tp, key.pp, key.dp, key.hardware, kind, int(tokens),
                 float(seconds), model, time.time()),
            )
        return True

    def measured(self, key: CalibrationKey, kind: str) -> Measured | None:
        """The speed of the last `RECENT_RUNS` runs of `kind` under `key`, if any."""
        if not self.path.exists():
            return None
        connection = sqlite3.connect(self.path, timeout=30)
        try:
            rows = connection.execute(
                "SELECT tokens, seconds FROM measurements WHERE shape=? AND backend=? AND dtype=? AND tp=? AND pp=?"
                " AND dp=? AND hardware=? AND kind=? ORDER BY recorded_at DESC LIMIT ?",
                (key.shape, key.backend, key.dtype, key.tp, key.pp, key.dp, key.hardware, kind, RECENT_RUNS),
            ).fetchall()
        except sqlite3.OperationalError:  # a file without the table yet
            return None
        finally:
            connection.close()
        if not rows:
            return None
        tokens, seconds = sum(r[0] for r in rows), sum(r[1] for r in rows)
        return Measured(tokens / seconds, len(rows), tokens)


@dataclass(frozen=True)
class KindEstimate:
    """One kind of work: the speed used, where it comes from, and the model's figure beside it."""

    kind: str
    source: str
    tokens_per_s: float
    modeled_tokens_per_s: float
    runs: int = 0

    def to_dict(self) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "source": self.source,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "modeled_tokens_per_s": round(self.modeled_tokens_per_s, 1),
        }
        if self.source == "measured":
            figures["runs"] = self.runs
            figures["measured_over_modeled"] = round(self.tokens_per_s / self.modeled_tokens_per_s, 3)
        return figures


def kind_estimates(
    key: CalibrationKey, modeled: Mapping[str, float], calibration: Calibration | None = None
) -> dict[str, KindEstimate]:
    """Per kind: the measured speed under `key` when there is one, else `modeled[kind]`."""
    calibration = calibration or Calibration()
    out = {}
    for kind in KINDS:
        found = calibration.measured(key, kind)
        if found is not None:
            out[kind] = KindEstimate(kind, "measured", found.tokens_per_s, modeled[kind], found.runs)
        else:
            out[kind] = KindEstimate(kind, "modeled", modeled[kind], modeled[kind])
    return out


def job_estimate(work_by_kind: Mapping[str, float], kinds: Mapping[str, KindEstimate]) -> dict[str, Any]:
    """Seconds of compute for a job's work per kind, with its source: `measured` when every kind
    it has was measured, `modeled` when none was, else `partly measured`."""
    work = {kind: float(tokens) for kind, tokens in work_by_kind.items() if tokens}
    seconds = sum(tokens / kinds[kind].tokens_per_s for kind, tokens in work.items())
    modeled = sum(tokens / kinds[kind].modeled_tokens_per_s for kind, tokens in work.items())
    sources = {kinds[kind].source for kind in work}
    source = sources.pop() if len(sources) == 1 else ("partly measured" if sources else "modeled")
    total = sum(work.values())
    return {
        "source": source,
        "seconds": round(seconds, 3),
        "modeled_seconds": round(modeled, 3),
        "tokens_per_s": round(total / seconds, 1) if seconds > 0 else None,
        "by_kind": {kind: kinds[kind].to_dict() for kind in work},
    }


def record_run(section: Mapping[str, Any], profile: Any, calibration: Calibration | None = None) -> list[str]:
    """Keep a finished run's speeds (its results.json `evalfleet` section); returns the kinds kept."""
    layout = section.get("layout") or {}
    machine = section.get("hardware") or {}
    if machine.get("gpu_name"):
        hardware = gpu_hardware(machine["gpu_name"])
    elif machine.get("cpu_threads"):
        hardware = cpu_hardware(machine["cpu_threads"])
    else:
        return []
    key = CalibrationKey(
        model_shape(profile), section["backend"]["name"], section["model"]["dtype"],
        layout.get("tp") or 1, layout.get("pp") or 1, layout.get("dp") or 1, hardware,
    )
    calibration = calibration or Calibration()
    kept = []
    for kind, figures in (section.get("timing", {}).get("by_kind") or {}).items():
        if calibration.record(key, kind, figures["tokens"], figures["seconds"], section["model"].get("path")):
            kept.append(kind)
    return kept


def plan_speeds(result: Any, inventory: Any) -> dict[str, Any]:
    """`evalfleet plan`'s speeds for its layout: per kind of work, measured where a run of the
    same key left one, else modeled. Without a job, a generation request is taken to have a
    prompt as long as its budget (a job's estimate uses its counted split instead)."""
    layout, device, node = result.layout, inventory.nodes[0].gpus[0], inventory.nodes[0]
    rates = modeled_rates(
        result.profile, layout.tp, layout.pp, layout.dp, tflops=device.spec.bf16_tflops,
        bandwidth_gbps=device.spec.memory_bandwidth_gbps, link_gbps=node.intra_bandwidth_gbps or 1.0,
        dtype=result.dtype, max_length=result.max_length, batch_size=result.batch_size or 8,
        device_map=layout.device_map,
    )
    prefill = result.estimated_tokens_per_s
    modeled = {"loglikelihood": prefill, "generation": 2 / (1 / prefill + 1 / rates["decode"])}
    key = CalibrationKey(model_shape(result.profile), result.backend, result.dtype, layout.tp, layout.pp, layout.dp,
                         inventory_hardware(inventory))
    kinds = kind_estimates(key, modeled)
    return {"key": key.describe(), "by_kind": {kind: estimate.to_dict() for kind, estimate in kinds.items()}}


def describe_speed(kind: str, figures: Mapping[str, Any]) -> str:
    """`log-likelihood ~51,226 tokens/s (measured, 3 runs; the model says 22,861)`."""
    label = {"loglikelihood": "log-likelihood", "generation": "generation (prompt + budget)"}[kind]
    text = f"{label} ~{figures['tokens_per_s']:,.0f} tokens/s ({figures['source']}"
    if figures["source"] == "measured":
        text += f", {figures['runs']} run{'s' if figures['runs'] != 1 else ''}; the model says {figures['modeled_tokens_per_s']:,.0f}"
    return text + ")"
