"""The data that crosses layers: what a user asks for and what they get back.

Every other layer imports from here, and this module imports no other part of evalfleet.
Validation errors are turned into one sentence naming the field by `describe_validation_error`.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
EngineName = Literal["auto", "lightweight", "distributed"]
Priority = Literal["high", "normal", "low"]


class DistributionStrategy(str, enum.Enum):
    """How one evaluation is laid out over devices. The values are the CLI's spellings."""

    SINGLE = "single"
    TENSOR_PARALLEL = "tp"
    PIPELINE_PARALLEL = "pp"
    HYBRID = "hybrid"
    DATA_PARALLEL = "dp"
    AUTO = "auto"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which model to evaluate and how to load it."""

    path: str = Field(description="local folder of a Hugging Face causal LM, 'demo', or a hub id")
    revision: str | None = None
    dtype: Dtype = "auto"
    device: Device = "auto"
    trust_remote_code: bool = False
    max_length: int | None = Field(default=None, gt=0)

    @field_validator("path")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the model path is empty")
        return value


class TaskSpec(_Strict):
    """Which lm-eval tasks to run, and how many examples of each."""

    names: list[str] = Field(min_length=1)
    include_path: str | None = None
    limit: int | None = Field(default=None, gt=0)
    num_fewshot: int | None = Field(default=None, ge=0)

    @field_validator("names", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list):
            value = [str(v).strip() for v in value if str(v).strip()]
        return value


class EvaluationRequest(_Strict):
    """One evaluation: a model, its tasks, and hints on how to run it."""

    model: ModelConfig
    tasks: TaskSpec
    engine: EngineName = "auto"
    backend: Literal["auto", "hf", "vllm"] = "auto"
    strategy: DistributionStrategy = DistributionStrategy.AUTO
    tp: int | None = Field(default=None, gt=0)
    pp: int | None = Field(default=None, gt=0)
    dp: int | None = Field(default=None, gt=0)
    gpus: int | None = Field(default=None, ge=0, description="GPUs the job may use (orchestrator)")
    batch_size: int | Literal["auto"] = "auto"
    max_batch_tokens: int | None = Field(default=None, gt=0)
    output_dir: str | None = None
    log_samples: bool = False
    use_cache: bool = True
    cache_path: str | None = None
    priority: Priority = "normal"
    seed: int = 1234

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "auto":
            try:
                value = int(value)
            except ValueError:
                raise ValueError("must be a positive whole number or 'auto'") from None
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be a positive whole number or 'auto'")
        return value

    @model_validator(mode="after")
    def _layout_hints(self) -> EvaluationRequest:
        if self.engine == "lightweight" and self.strategy not in (
            DistributionStrategy.AUTO,
            DistributionStrategy.SINGLE,
        ):
            raise ValueError(
                f"the lightweight engine runs on one device and cannot use strategy '{self.strategy.value}'"
            )
        return self


class EvaluationResult(BaseModel):
    """lm-eval's results document plus evalfleet's own section (engine, layout, timing, cache)."""

    model_config = ConfigDict(extra="allow")

    results: dict[str, Any]
    evalfleet: dict[str, Any] = Field(default_factory=dict)
    output_path: str | None = None

    def document(self) -> dict[str, Any]:
        """The results.json content: lm-eval's keys at top level, then `evalfleet`."""
        return {**self.results, "evalfleet": self.evalfleet}

    def metrics(self) -> dict[str, dict[str, Any]]:
        return self.results.get("results", {})


def describe_validation_error(error: ValidationError) -> str:
    """One readable sentence for the first problem pydantic found."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__")
    message = first.get("msg", "is invalid")
    message = message.removeprefix("Value error, ")
    if where:
        return f"invalid value for '{where}': {message}"
    return f"invalid request: {message}"


DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "demo-model"


def resolve_model_path(path: str) -> str:
    """`demo` names the bundled demo model; `~` is expanded; anything else is used as given."""
    if path == "demo":
        return str(DEMO_MODEL_DIR)
    return str(Path(path).expanduser()) if path.startswith("~") else path


def default_output_dir(model_path: str) -> Path:
    return Path("runs") / Path(model_path.rstrip("/")).name


class EvalfleetError(Exception):
    """A problem the user can fix. The CLI prints its message as one line and exits with `exit_code`.

    `failure` is how the scheduler treats it (see `orchestrator/failures.py`): by default the
    same request fails the same way anywhere, so a retry or blaming the devices would not help.
    """

    exit_code = 1
    failure = "deterministic"


class UsageError(EvalfleetError):
    """Bad arguments or bad input files: exit code 2."""

    exit_code = 2
    failure = "request"


class ResourceError(EvalfleetError):
    """The work did not fit the devices' memory; a smaller budget or a larger layout may fit."""

    failure = "resource"


class InfrastructureError(EvalfleetError):
    """A process, a collective or a node was lost; a retry may succeed, the devices may be at fault."""

    failure = "infrastructure"


class NodeLost(InfrastructureError):
    """A machine (or a rank's process on it) went away mid-job: nobody's mistake, so retried at once
    on the nodes that remain, and no device is blamed."""

    exit_code = 75  # EX_TEMPFAIL
