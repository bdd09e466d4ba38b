"""Sweeps: models × task sets × settings, submitted as one group of jobs (`evalfleet sweep`, `POST /api/v1/sweeps`).

A sweep file names its models (paths, names, or globs such as `ckpts/step-*`, whose matches are
taken in natural order, so step-2 comes before step-10), its task sets and its settings (each a
mapping of `submit`'s options by lm-eval's names). Every cell of the matrix becomes one request,
submitted through the path `evalfleet submit` takes, in one group. A cell that a job with the
same score-changing settings already covers (`groups.covering_jobs`) is skipped, so submitting
the same file again submits only what is new: the matches a glob has gained, a setting added.
The same file submitted again joins its earlier group.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evalfleet.orchestrator.groups import covering_jobs, key_text
from evalfleet.orchestrator.store import JobStore
from evalfleet.tasks.harness_args import request_fields
from evalfleet.types import EvalfleetError, EvaluationRequest, Priority, UsageError, describe_validation_error

MAX_CELLS = 1000
"""A sweep larger than this is refused: most likely a glob that matched more than was meant."""
GLOB_CHARACTERS = re.compile(r"[*?\[]")
_Text = Annotated[str, Field(min_length=1, max_length=1024)]


class SweepSettings(BaseModel):
    """One column of the matrix: `evalfleet submit`'s options by lm-eval's names, as in its flags."""

    model_config = ConfigDict(extra="forbid")

    num_fewshot: int | None = None
    limit: int | None = None
    priority: Priority | None = None
    include_path: _Text | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["auto", "hf", "vllm"] = "auto"
    strategy: Literal["auto", "single", "tp", "pp", "hybrid", "dp", "device_map"] = "auto"
    tp: int | None = None
    pp: int | None = None
    dp: int | None = None
    gpus: int | None = None
    batch_size: int | Literal["auto"] = "auto"
    max_batch_tokens: int | None = None
    log_samples: bool = False
    use_cache: bool = True
    apply_chat_template: bool | Annotated[str, Field(max_length=256)] = False
    fewshot_as_multiturn: bool | None = None
    system_instruction: Annotated[str, Field(max_length=32 * 1024)] | None = None
    gen_kwargs: dict[str, Any] | Annotated[str, Field(max_length=4096)] | None = None
    seed: int | Annotated[str, Field(max_length=256)] | list[int | None] | None = None
    model_args: dict[str, Any] | Annotated[str, Field(max_length=4096)] | None = None
    predict_only: bool = False
    samples: dict[str, list[int]] | None = Field(default=None, description="document ids per task (not a file)")
    confirm_run_unsafe_code: bool = False
    metadata: dict[str, Any] | Annotated[str, Field(max_length=4096)] | None = None

    def shown(self) -> dict[str, Any]:
        """The options this setting gives, as written (for the matrix and the group's record)."""
        return self.model_dump(mode="json", exclude_unset=True)


class SweepSpec(BaseModel):
    """A sweep file (YAML), or the body of `POST /api/v1/sweeps` (the same, as JSON)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    models: list[_Text] = Field(min_length=1, max_length=256, description="paths, names or globs (ckpts/step-*)")
    tasks: list[list[_Text] | _Text] = Field(min_length=1, max_length=256,
                                             description="task sets: each a list or a comma-separated string")
    settings: list[SweepSettings] = Field(default_factory=lambda: [SweepSettings()], min_length=1, max_length=256)
    priority: Priority = "normal"
    limit: int | None = Field(default=None, gt=0, description="for every cell whose settings name none")

    @field_validator("tasks")
    @classmethod
    def _task_sets(cls, value: list[list[str] | str]) -> list[list[str]]:
        sets = []
        for entry in value:
            names = [name.strip() for name in (entry.split(",") if isinstance(entry, str) else entry) if name.strip()]
            if not names:
                raise ValueError("a task set names no task")
            sets.append(names)
        return sets


@dataclass(frozen=True)
class Cell:
    """One job of the matrix: a model, a task set and the setting (its index and options)."""

    model: str
    tasks: list[str]
    setting: int
    options: dict[str, Any]
    request: EvaluationRequest

    def document(self) -> dict[str, Any]:
        return {"model": self.model, "tasks": self.tasks, "setting": self.setting, "options": self.options}


@dataclass
class SweepOutcome:
    group_id: str | None
    submitted: list[tuple[Cell, str]] = field(default_factory=list)
    skipped: list[tuple[Cell, str, str]] = field(default_factory=list)
    """(cell, the job that covers it, that job's state)."""

    def document(self) -> dict[str, Any]:
        return {"group": self.group_id, "submitted": [{**cell.document(), "job": job} for cell, job in self.submitted],
                "skipped": [{**cell.document(), "covered_by": job, "state": state}
                            for cell, job, state in self.skipped]}

    def summary(self) -> str:
        return (f"group {self.group_id}: {len(self.submitted)} submitted, {len(self.skipped)} skipped "
                "(already with results, or queued or running with the same settings)")


def read_sweep_file(path: str | Path) -> SweepSpec:
    """The sweep file at `path`, validated; a UsageError in one sentence otherwise."""
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UsageError(f"cannot read the sweep file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"the sweep file {path} is not valid YAML{where}: {problem}") from None
    return parse_sweep(data, f"the sweep file {path}")


def parse_sweep(data: Any, source: str = "the sweep") -> SweepSpec:
    if not isinstance(data, dict):
        raise UsageError(f"{source} must be a mapping with models, tasks and settings")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "extra_forbidden":
            where = ".".join(str(p) for p in first["loc"])
            known = SweepSettings.model_fields if len(first["loc"]) > 1 else SweepSpec.model_fields
            raise UsageError(f"{source}: unknown key '{where}' (it takes {', '.join(known)})") from None
        raise UsageError(f"{source}: {describe_validation_error(error)}") from None


def natural_key(text: str) -> list[Any]:
    """`step-2` before `step-10`: runs of digits compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def expand_models(patterns: list[str], admit_pattern: Callable[[str], None] | None = None) -> list[str]:
    """Each model as given, or a glob's matching folders in natural order; a glob matching none is refused.

    `admit_pattern` checks a glob before it is listed (the service confines it to its model roots).
    """
    models: list[str] = []
    for pattern in patterns:
        if not GLOB_CHARACTERS.search(pattern):
            models.append(pattern)
            continue
        if admit_pattern is not None:
            admit_pattern(pattern)
        matches = sorted((m for m in glob.glob(str(Path(pattern).expanduser())) if Path(m).is_dir()), key=natural_key)
        if not matches:
            raise UsageError(f"the model pattern '{pattern}' matches no folder")
        models.extend(matches)
    return models


def matrix(spec: SweepSpec, models: list[str]) -> list[Cell]:
    """Every cell, models outermost, then task sets, then settings; each request checked as `submit` checks it."""
    cells = []
    count = len(models) * len(spec.tasks) * len(spec.settings)
    if count > MAX_CELLS:
        raise UsageError(f"the sweep has {count} cells, more than {MAX_CELLS}; narrow its models or settings")
    for model in models:
        for tasks in spec.tasks:
            for index, setting in enumerate(spec.settings):
                cells.append(Cell(model, tasks, index, setting.shown(), _request(spec, model, tasks, setting)))
    return cells


def _request(spec: SweepSpec, model: str, tasks: list[str], setting: SweepSettings) -> EvaluationRequest:
    options = setting.model_dump()
    limit = setting.limit if setting.limit is not None else spec.limit
    try:
        fields = request_fields(
            model={"path": model, "dtype": options["dtype"]},
            **{name: options[name] for name in ("model_args", "apply_chat_template", "fewshot_as_multiturn",
                                                "system_instruction", "gen_kwargs", "seed", "predict_only", "samples",
                                                "confirm_run_unsafe_code", "metadata")},
        )
        return EvaluationRequest.model_validate({
            **fields,
            "tasks": {"names": tasks, "include_path": setting.include_path, "limit": limit,
                      "num_fewshot": setting.num_fewshot},
            "priority": setting.priority or spec.priority,
            **{name: options[name] for name in ("backend", "strategy", "tp", "pp", "dp", "gpus", "batch_size",
                                                "max_batch_tokens", "log_samples", "use_cache")},
        })
    except (ValidationError, UsageError) as error:
        reason = describe_validation_error(error) if isinstance(error, ValidationError) else str(error)
        raise UsageError(f"the cell {_cell_text(model, tasks, setting.shown())}: {reason}") from None


def _cell_text(model: str, tasks: list[str], options: dict[str, Any]) -> str:
    return f"{model} × {','.join(tasks)} × {options or 'default settings'}"


def submit_sweep(store: JobStore, spec: SweepSpec, cells: list[Cell], submit: Callable[[EvaluationRequest, str], str],
                 origin: dict[str, Any] | None = None) -> SweepOutcome:
    """Submit every cell not yet covered, in one group: the earlier group of the same sweep, else a new one.

    `submit(request, group_id)` queues one job as `evalfleet submit` does. A cell that fails to submit
    ends the sweep with its reason; the cells before it stay queued in the group, and submitting the
    sweep again skips them.
    """
    record = {"sweep": spec.model_dump(mode="json", exclude_unset=True), **(origin or {})}
    outcome = SweepOutcome(group_id=None)
    covering = covering_jobs(store)
    for cell in cells:
        key = key_text(cell.request)
        if key in covering:
            outcome.skipped.append((cell, covering[key].id, covering[key].state.value))
            continue
        if outcome.group_id is None:
            outcome.group_id = _group_for(store, spec.name, record)
        try:
            job_id = submit(cell.request, outcome.group_id)
        except EvalfleetError as error:
            raise type(error)(f"the cell {_cell_text(cell.model, cell.tasks, cell.options)} was refused"
                              f" ({len(outcome.submitted)} submitted before it, in group "
                              f"{outcome.group_id}): {error}") from None
        outcome.submitted.append((cell, job_id))
        covering[key] = store.get(job_id)
    if outcome.group_id is None:  # nothing new: the sweep's earlier group, if it has one
        outcome.group_id = _group_for(store, spec.name, record, create=False)
    return outcome


def _group_for(store: JobStore, name: str | None, record: dict[str, Any], create: bool = True) -> str | None:
    for group in reversed(store.groups("sweep")):
        if group.name == name and group.spec == record:
            return group.id
    return store.create_group("sweep", name, record) if create else None


def sweep_command(file: str, *, db: str | None, pool: str | None, dry_run: bool, as_json: bool) -> None:
    """`evalfleet sweep FILE`: the matrix submitted (or, with `dry_run`, shown), then what was submitted and skipped."""
    from evalfleet.orchestrator.console import open_store, submit_job

    spec = read_sweep_file(file)
    cells = matrix(spec, expand_models(spec.models))
    with open_store(db) as store:
        if dry_run:
            covering = covering_jobs(store)
            plan = [(cell, covering.get(key_text(cell.request))) for cell in cells]
            if as_json:
                print(json.dumps({"cells": [{**cell.document(), "covered_by": job.id if job else None}
                                            for cell, job in plan]}, indent=2))
                return
            _print_matrix(plan)
            return
        outcome = submit_sweep(store, spec, cells, lambda request, group: submit_job(request, db, pool, group_id=group),
                               origin={"folder": str(Path.cwd())})
    if as_json:
        print(json.dumps(outcome.document(), indent=2))
    else:
        print(outcome.summary())


def _print_matrix(plan: list[tuple[Cell, Any]]) -> None:
    from rich.table import Table

    from evalfleet.orchestrator.console import _console

    table = Table(title=f"sweep: {len(plan)} cells", pad_edge=False)
    for column in ("#", "model", "tasks", "settings", "will"):
        table.add_column(column, overflow="fold")
    for number, (cell, job) in enumerate(plan, 1):
        will = f"skip: job {job.id} is {job.state.value}" if job else "submit"
        table.add_row(str(number), cell.model, ",".join(cell.tasks), json.dumps(cell.options), will)
    _console().print(table)
