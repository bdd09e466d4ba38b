"""What tasks a job submitted over HTTP may name: tasks from clients are data, never code.

An lm-eval task YAML can run code on the machine that builds it (`!function` modules,
`custom_dataset`, `process_docs`, metrics loaded by Hugging Face `evaluate`), read any of its
files (`include:`, `dataset_kwargs.data_files`, a local `dataset_path`, `use_prompt` files),
and its Jinja templates can reach Python. So over HTTP a job names lm-eval's built-in tasks,
a folder under the operator's task roots (`serve --task-root`: trusted, the operator wrote
them), or one uploaded task YAML that `check_task_yaml` accepts as data: no YAML tags, no
code-bearing keys, metrics by lm-eval's registered names, includes only of YAMLs under a task
root (absolute paths), and dataset files only under the task or data roots (absolute paths;
a relative `dataset_path` is a hub id). The accepted YAML is written back (as the data it
parsed to) into a server-owned folder, `uploaded-tasks/<hash>/` beside the job store, which
becomes the job's `include_path`. Every job from a client is marked `untrusted`: lm-eval
builds its tasks only in worker processes (its size is counted in one, `engines/job_size.py`)
and renders their templates in jinja's sandbox (`tasks.sandboxed_templates`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from evalfleet.service.security import HUB_ID, Forbidden, resolve_under, root_folders
from evalfleet.types import EvaluationRequest, UsageError

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CODE_KEYS = {
    "custom_dataset": "it names code that loads the data",
    "process_docs": "it names code run over the documents",
    "process_results": "it names code that scores the answers",
    "use_prompt": "it loads prompts from other files or packages",
    "unsafe_code": "it is for tasks that run generated code",
}
DATASET_KWARGS = ("data_files", "data_dir", "revision")


class TaskRefused(UsageError):
    """An uploaded task YAML that is not plain data within the roots (HTTP 422)."""


class _DataLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases, which could multiply a small file into a huge config."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise TaskRefused("the task YAML uses an alias (*name); write each value out")
        return super().compose_node(parent, index)


def _refuse_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise TaskRefused(f"the task YAML uses the tag {node.tag}: an uploaded task is data, with no "
                      "!function or other tags (put tasks with code under a --task-root)")


_DataLoader.add_constructor(None, _refuse_tag)


class TaskPolicy:
    """The operator's task and data roots, and the folder where accepted uploads are kept."""

    def __init__(self, task_roots: list[str], data_roots: list[str], uploads: Path) -> None:
        self.task_roots = root_folders(task_roots, "--task-root")
        self.data_roots = root_folders(data_roots, "--data-root")
        self.uploads = uploads

    def admit(self, request: EvaluationRequest, task_yaml: str | None = None) -> EvaluationRequest:
        """The request as the service queues it (task folder resolved, or the upload kept), marked
        untrusted; Forbidden or TaskRefused with the reason."""
        include = request.tasks.include_path
        if include is not None and task_yaml is not None:
            raise UsageError("give include_path or task_yaml, not both")
        if include is not None:
            folder = resolve_under(include, self.task_roots, "task folder", "task")
            if not folder.is_dir():
                raise Forbidden(f"the task folder {include} is not a folder")
            include = str(folder)
        elif task_yaml is not None:
            config = check_task_yaml(task_yaml, self.task_roots, self.task_roots + self.data_roots)
            if config["task"] not in request.tasks.names:
                raise TaskRefused(f"the uploaded task '{config['task']}' is not among the job's tasks "
                                  f"({', '.join(request.tasks.names)})")
            include = str(self._keep(config))
        tasks = request.tasks.model_copy(update={"include_path": include, "untrusted": True})
        return request.model_copy(update={"tasks": tasks})

    def _keep(self, config: dict[str, Any]) -> Path:
        """Write the accepted task as the data it parsed to, so lm-eval reads exactly what was checked."""
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        folder = self.uploads / hashlib.sha256(text.encode()).hexdigest()[:32]
        if folder.is_dir():
            return folder
        self.uploads.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=self.uploads, prefix=".partial-"))
        (partial / f"{config['task']}.yaml").write_text(text)
        try:
            partial.rename(folder)
        except OSError:  # the same task, kept at the same moment by another request
            shutil.rmtree(partial, ignore_errors=True)
        return folder


def check_task_yaml(text: str, task_roots: list[Path], dataset_roots: list[Path]) -> dict[str, Any]:
    """The uploaded task as data, its paths resolved; TaskRefused (or Forbidden for a path) if it
    could make lm-eval run code or read a file outside the roots (`dataset_roots`: the task and
    data roots). Parsed by YAML's safe loader, never by lm-eval's, which imports the modules that
    `!function` names."""
    try:
        config = yaml.load(text, Loader=_DataLoader)  # noqa: S506 - a safe loader that refuses every tag
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # ValueError: a malformed date or number
        raise TaskRefused(f"the task YAML does not parse: {' '.join(str(error).split())}") from None
    if not isinstance(config, dict):
        raise TaskRefused("the task YAML must be a mapping of lm-eval task settings")
    if "group" in config or "task_list" in config:
        raise TaskRefused("an uploaded task YAML defines one task, not a group; put groups under a --task-root")
    if not isinstance(config.get("task"), str) or not TASK_NAME.match(config["task"]):
        raise TaskRefused("an uploaded task YAML names its one task as 'task: NAME' (letters, digits, '_', '.', '-')")
    fewshot = config.get("fewshot_config")
    for key, why in CODE_KEYS.items():
        if key in config or (isinstance(fewshot, dict) and key in fewshot):
            raise TaskRefused(f"'{key}' is not taken in an uploaded task: {why}")
    if "include" in config:
        config["include"] = _includes(config["include"], task_roots)
    if "dataset_path" in config:
        config["dataset_path"] = _dataset_path(config["dataset_path"], dataset_roots)
    if "dataset_kwargs" in config:
        config["dataset_kwargs"] = _dataset_kwargs(config["dataset_kwargs"], dataset_roots)
    _check_metrics(config.get("metric_list"))
    return config


def _includes(value: Any, task_roots: list[Path]) -> list[str]:
    """Absolute paths of YAMLs under a task root (the operator's, so trusted as they are)."""
    resolved = []
    for include in value if isinstance(value, list) else [value]:
        if not isinstance(include, str) or not os.path.isabs(include):
            raise TaskRefused(f"the include {include!r} is not an absolute path; name a YAML under a --task-root")
        path = resolve_under(include, task_roots, "included task file", "task")
        if not path.is_file() or path.suffix not in (".yaml", ".yml"):
            raise TaskRefused(f"the include {include} is not a YAML file")
        resolved.append(str(path))
    return resolved


def _dataset_path(value: Any, roots: list[Path]) -> str:
    """A hub dataset id (or a builder such as `json`), or a folder under the task or data roots."""
    if not isinstance(value, str):
        raise TaskRefused("dataset_path must be a string")
    if os.path.isabs(value):
        return str(resolve_under(value, roots, "dataset", "data"))
    if not HUB_ID.match(value) or ".." in value or value.endswith(".py") or Path(value).exists():
        raise TaskRefused(f"the dataset_path {value} is neither a hub dataset id nor an absolute path "
                          "under the task or data roots")
    return value


def _dataset_kwargs(value: Any, roots: list[Path]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TaskRefused("dataset_kwargs must be a mapping")
    extra = [key for key in value if key not in DATASET_KWARGS]
    if extra:
        raise TaskRefused(f"dataset_kwargs.{extra[0]} is not taken in an uploaded task "
                          f"(only {', '.join(DATASET_KWARGS)})")
    kwargs = dict(value)
    if "data_files" in kwargs:
        kwargs["data_files"] = _data_files(kwargs["data_files"], roots)
    if "data_dir" in kwargs:
        kwargs["data_dir"] = _data_file(kwargs["data_dir"], roots, "data folder")
    return kwargs


def _data_files(value: Any, roots: list[Path]) -> Any:
    """`data_files` as `datasets` takes it (a path, a list of paths, or splits to those), resolved."""
    if isinstance(value, dict):
        return {str(split): _split_files(files, roots) for split, files in value.items()}
    return _split_files(value, roots)


def _split_files(value: Any, roots: list[Path]) -> str | list[str]:
    if isinstance(value, list):
        return [_data_file(item, roots, "data file") for item in value]
    return _data_file(value, roots, "data file")


def _data_file(value: Any, roots: list[Path], what: str) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise TaskRefused(f"the {what} {value!r} is not an absolute path; give one under the task or data roots")
    return str(resolve_under(value, roots, what, "data"))


def _check_metrics(metrics: Any) -> None:
    """Metrics by lm-eval's registered names: another name would be loaded (as code) by `evaluate`."""
    if metrics is None:
        return
    if not isinstance(metrics, list) or not all(isinstance(entry, dict) for entry in metrics):
        raise TaskRefused("metric_list must be a list of mappings")
    from lm_eval.api import metrics as _registers_them  # noqa: F401 - lm-eval's own metrics, by name
    from lm_eval.api.registry import metric_registry

    for entry in metrics:
        name = entry.get("metric")
        if "hf_evaluate" in entry:
            raise TaskRefused("'hf_evaluate' is not taken in an uploaded task: it loads the metric as code")
        if not isinstance(name, str) or name not in metric_registry:
            raise TaskRefused(f"the metric {name!r} is not one of lm-eval's registered metrics")
