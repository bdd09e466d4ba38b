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
    # The layers split over a node's GPUs in one process (accelerate's device_map, lm-eval's
    # parallelize=True): for models transformers cannot pipeline; one GPU computes at a time.
    DEVICE_MAP = "device_map"
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
    add_bos_token: bool | None = Field(default=None, description="lm-eval's hf model argument: None lets the "
                                       "tokenizer decide, as lm-eval does")
    chat_template_args: dict[str, Any] = Field(default_factory=dict, description="extra variables for the chat "
                                               "template (lm-eval's chat_template_args; enable_thinking lands here)")

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
    untrusted: bool = Field(default=False, description="named by an HTTP client: lm-eval builds the tasks only "
                            "in worker processes, and renders their templates in jinja's sandbox")

    @field_validator("names", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list):
            value = [str(v).strip() for v in value if str(v).strip()]
        return value


# The generation settings evalfleet's backends honour, by lm-eval's names (the max_* are its aliases).
GENERATION_SETTINGS = ("until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens",
                       "do_sample", "temperature", "top_p", "top_k", "seed")
DEFAULT_SEEDS = (0, 1234, 1234, 1234)
Seed = int | None


class HarnessOptions(_Strict):
    """What lm-eval's command line says about prompts, generation and scoring, handed to lm-eval as is.

    Each field is the `simple_evaluate` argument of the same name, so a run builds the prompts lm-eval
    builds; the checks here are those that need no model or task loaded.
    """

    apply_chat_template: bool | str = Field(default=False, description="true, or the name of one of the "
                                            "tokenizer's chat templates")
    fewshot_as_multiturn: bool | None = Field(default=None, description="few-shot examples as chat turns; "
                                              "None: on with a chat template, as lm-eval's command line has it")
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] = Field(default_factory=dict, description="overrides of the tasks' generation "
                                       "settings: " + ", ".join(GENERATION_SETTINGS))
    predict_only: bool = Field(default=False, description="keep the generations, compute no metric")
    samples: dict[str, list[int]] | None = Field(default=None, description="document ids to evaluate, per task")
    confirm_run_unsafe_code: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict, description="lm-eval's task metadata (the model "
                                     "arguments are merged in, as its command line does)")

    @field_validator("apply_chat_template")
    @classmethod
    def _template_name(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not value.strip():
            raise ValueError("a chat template name cannot be empty")
        return value

    @field_validator("gen_kwargs")
    @classmethod
    def _generation_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, setting in value.items():
            if name not in GENERATION_SETTINGS:
                raise ValueError(f"'{name}' is not a generation setting evalfleet applies (it takes "
                                 f"{', '.join(GENERATION_SETTINGS)})")
            if name == "until":
                if not (isinstance(setting, str) or (isinstance(setting, list) and all(isinstance(s, str) for s in setting))):
                    raise ValueError("until must be a string or a list of strings")
            elif name == "do_sample":
                if not isinstance(setting, bool):
                    raise ValueError("do_sample must be true or false")
            elif isinstance(setting, bool) or not isinstance(setting, int | float):
                raise ValueError(f"{name} must be a number")
            elif name in ("temperature", "top_k") and setting < 0 or name == "top_p" and not 0 < setting <= 1:
                raise ValueError(f"{name}={setting} is out of range")
            elif name.startswith("max_") and (setting != int(setting) or setting <= 0):
                raise ValueError(f"{name} must be a positive whole number")
        return value

    @field_validator("samples")
    @classmethod
    def _doc_ids(cls, value: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
        """Sorted and without repeats: lm-eval labels the documents it picks by the list's order."""
        if value is None:
            return None
        for task, ids in value.items():
            if not ids or min(ids) < 0:
                raise ValueError(f"the document ids for '{task}' must be a non-empty list of numbers from 0")
        return {task: sorted(set(ids)) for task, ids in value.items()}

    @model_validator(mode="after")
    def _multiturn_needs_template(self) -> HarnessOptions:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("few-shot examples as chat turns need a chat template (apply_chat_template)")
        return self

    @property
    def multiturn(self) -> bool:
        """Whether few-shot examples become chat turns: lm-eval's command line turns it on with a template."""
        return bool(self.apply_chat_template) if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn


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
    wandb_args: dict[str, Any] | None = Field(default=None, description="lm-eval's --wandb_args (wandb.init's "
                                             "arguments): the finished run is logged by lm-eval's WandbLogger")
    use_cache: bool = True
    cache_path: str | None = None
    priority: Priority = "normal"
    harness: HarnessOptions = Field(default_factory=HarnessOptions)
    seed: tuple[Seed, Seed, Seed, Seed] = Field(default=DEFAULT_SEEDS, description="lm-eval's four seeds: "
                                                "python, numpy, torch (sampling), few-shot; one number sets all four")

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

    @field_validator("seed", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> Any:
        """As lm-eval's command line: one seed stands for all four, three are completed with its defaults."""
        if isinstance(value, int) and not isinstance(value, bool) or value is None:
            return (value,) * 4
        if isinstance(value, list | tuple) and len(value) in (1, 3):
            return tuple(value) * 4 if len(value) == 1 else (*value, DEFAULT_SEEDS[3])
        return value

    @model_validator(mode="after")
    def _samples_or_limit(self) -> EvaluationRequest:
        if self.harness.samples is not None and self.tasks.limit is not None:
            raise ValueError("give either document ids (samples) or a limit, not both")
        return self

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


STARTED_AT_VARIABLE = "EVALFLEET_STARTED_AT"
"""When a scheduler handed a job to its worker process (epoch seconds): the job's start-up counts
from there, as a process kept warm before it (`executors.standby`) did its imports in advance."""
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
