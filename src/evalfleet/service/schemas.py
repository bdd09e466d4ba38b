"""The API's request and response bodies, as they appear in the OpenAPI document.

`JobSubmission` carries exactly what `evalfleet submit` takes, minus the options that
name files on the server (cache and output paths), plus an uploaded task YAML: the semantic
checks are `EvaluationRequest`'s own, so the API refuses what the command refuses, and what
tasks a client may name is `task_policy`'s.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from evalfleet.orchestrator.states import JobState
from evalfleet.types import UsageError

MAX_PAGE = 200
MAX_SAMPLES_PAGE = 100
MAX_TASK_YAML = 32 * 1024
_Name = Field(min_length=1, max_length=512)


class Problem(BaseModel):
    detail: str = Field(description="one sentence saying what is wrong")


class JobSubmission(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=1024, description="'demo', or a model folder under an allowed root")
    tasks: list[str] = Field(default=["demo_mc", "demo_arith"], min_length=1, max_length=64)
    include_path: str | None = Field(default=None, max_length=1024,
                                     description="a task folder under one of the server's task roots (--task-root)")
    task_yaml: str | None = Field(default=None, min_length=1, max_length=MAX_TASK_YAML,
                                  description="one lm-eval task YAML, taken as data: no !function or other tags, "
                                              "no code-bearing keys, includes and dataset files only under the "
                                              "server's task or data roots; name its task in `tasks`")
    limit: int | None = Field(default=None, description="evaluate only the first N examples of each task")
    num_fewshot: int | None = None
    priority: Literal["high", "normal", "low"] = "normal"
    gpus: int | None = None
    strategy: Literal["auto", "single", "tp", "pp", "hybrid", "dp", "device_map"] = "auto"
    tp: int | None = None
    pp: int | None = None
    dp: int | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    max_batch_tokens: int | None = None
    log_samples: bool = True
    use_cache: bool = True
    # lm-eval's flags, by its names; mappings as JSON objects or its `key=value,...` strings
    apply_chat_template: bool | Annotated[str, Field(max_length=256)] = Field(
        default=False, description="true, or the name of one of the tokenizer's chat templates")
    fewshot_as_multiturn: bool | None = Field(default=None, description="few-shot examples as chat turns "
                                              "(default: on with a chat template)")
    system_instruction: str | None = Field(default=None, max_length=MAX_TASK_YAML)
    gen_kwargs: dict[str, Any] | str | None = Field(default=None, description="until, max_gen_toks, do_sample, "
                                                    "temperature, top_p, top_k, seed")
    seed: int | str | list[int | None] | None = Field(default=None, description="python, numpy, torch, fewshot "
                                                      "(default 0,1234,1234,1234); one number sets all four")
    model_args: dict[str, Any] | str | None = Field(default=None, description="revision, dtype, max_length, "
                                                    "add_bos_token, enable_thinking, chat_template_args")
    predict_only: bool = False
    samples: dict[str, list[int]] | None = Field(default=None, description="document ids to evaluate, per task")
    confirm_run_unsafe_code: bool = Field(default=False, description="refused over HTTP: tasks that run the "
                                          "model's code are submitted on the server (`evalfleet submit`)")
    metadata: dict[str, Any] | str | None = None

    def request_fields(self) -> dict[str, Any]:
        """The `EvaluationRequest` fields this submission stands for, lm-eval's flags read as its
        command line reads them; what would run code on the server is refused."""
        from evalfleet.tasks.harness_args import request_fields

        if self.confirm_run_unsafe_code:
            raise UsageError("tasks that execute the model's code cannot be confirmed over HTTP; "
                             "submit them on the server with evalfleet submit --confirm-run-unsafe-code")
        harness = request_fields(
            model={"path": self.model, "dtype": self.dtype}, model_args=self.model_args,
            apply_chat_template=self.apply_chat_template, fewshot_as_multiturn=self.fewshot_as_multiturn,
            system_instruction=self.system_instruction, gen_kwargs=self.gen_kwargs, seed=self.seed,
            predict_only=self.predict_only, samples=self.samples, metadata=self.metadata,
        )
        if harness["model"].get("trust_remote_code"):
            raise UsageError("trust_remote_code cannot be set over HTTP")
        return {
            **harness,
            "tasks": {"names": self.tasks, "include_path": self.include_path, "limit": self.limit,
                      "num_fewshot": self.num_fewshot},
            "strategy": self.strategy, "tp": self.tp, "pp": self.pp, "dp": self.dp, "gpus": self.gpus,
            "priority": self.priority, "batch_size": self.batch_size, "max_batch_tokens": self.max_batch_tokens,
            "log_samples": self.log_samples, "use_cache": self.use_cache,
        }


class Submitted(BaseModel):
    id: str


class Progress(BaseModel):
    done: int
    total: int | None
    fraction: float | None
    tokens_per_s: float | None
    requests_per_s: float | None
    eta_s: float | None


class JobEvent(BaseModel):
    at: float
    from_: str | None = Field(alias="from")
    to: str
    attempt: int
    reason: str | None


class Job(BaseModel):
    id: str
    state: JobState
    priority: str
    attempts: int = Field(description="launches, retries and resumptions included")
    failures: int
    max_attempts: int
    model: str
    tasks: list[str]
    limit: int | None
    group: str | None = Field(default=None, description="the group (a sweep, a checkpoint watch) it was submitted in")
    progress: Progress
    devices: list[list[int]]
    pid: int | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    retry_at: float | None
    result_path: str | None
    error: str | None
    events: list[JobEvent]


class JobPage(BaseModel):
    total: int
    offset: int
    limit: int
    jobs: list[Job]


class SamplePage(BaseModel):
    job: str
    task: str
    total: int
    offset: int
    limit: int
    samples: list[dict[str, Any]]


class Device(BaseModel):
    node: int
    index: int
    name: str
    memory_gb: float
    job: str | None
    quarantined: str | None
    status: Literal["free", "busy", "quarantined"]


class PoolNode(BaseModel):
    index: int
    name: str
    interconnect: str
    devices: list[Device]


class Pool(BaseModel):
    scheduler: dict[str, Any] | None = Field(description="the scheduler that recorded this pool; null if none ever ran")
    description: str | None
    nodes: list[PoolNode]
    monitor: dict[str, Any] | None = Field(description="the monitor's latest snapshot of this machine")


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(description="degraded (HTTP 503) while serve's scheduler is down")
    scheduler: Literal["running", "restarting", "external"] = Field(
        description="the scheduler `serve` runs: running, or restarting after it exited; external when "
                    "serve runs none (another process schedules)")
