"""The bridge to lm-eval's tasks: our demo tasks, the user's folders, then lm-eval's own.

lm-eval's built-in index costs seconds to build, so it is loaded only when a requested
task is not found among the demo tasks and the user's `--include-path` folders, and it is
kept on disk once built (`lm_eval_index`).
lm-eval skips a task file it cannot parse without a word; we check them first and say so.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evalfleet.tasks import lm_eval_index
from evalfleet.types import UsageError

DEMO_TASKS_DIR = Path(__file__).parent / "demo"
DEMO_TASKS = ("demo_mc", "demo_arith", "demo_ppl")


def check_task_folder(folder: Path) -> None:
    """Refuse a missing folder or a task YAML that lm-eval would silently ignore."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not folder.is_dir():
        raise UsageError(f"task folder '{folder}' does not exist")
    for path in sorted(folder.glob("**/*.yaml")):
        try:
            load_yaml(path, resolve_func=False, recursive=True)
        except Exception as error:  # lm-eval raises yaml, import, type and key errors alike
            reason = " ".join(str(error).split())
            raise UsageError(f"task file '{path}' is malformed: {reason}") from error


def _search_paths(include_path: str | None) -> list[Path]:
    paths = [DEMO_TASKS_DIR]
    if include_path:
        folder = Path(include_path).expanduser()
        check_task_folder(folder)
        paths.append(folder)
    return paths


def build_task_manager(names: list[str], include_path: str | None = None, metadata: dict | None = None):
    """A TaskManager (lm-eval's) that knows every name in `names`, or a UsageError naming the unknown
    ones; `metadata` goes into every task's config, as lm-eval's `--metadata` does."""
    return _task_manager(tuple(names), include_path, json.dumps(metadata or {}, sort_keys=True, default=str))


@functools.lru_cache(maxsize=4)
def _task_manager(names: tuple[str, ...], include_path: str | None, metadata: str):
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    paths = _search_paths(include_path)
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=json.loads(metadata))
    if all(name in manager.all_tasks for name in names):
        return manager
    manager = lm_eval_index.task_manager(paths, json.loads(metadata))
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise UsageError(f"unknown task '{name}'{hint}")
    return manager


def dataset_loads_uncounted() -> None:
    """From now on in this process, `datasets` sends no download-count request to the Hub when it
    loads a task's data (unless HF_UPDATE_DOWNLOAD_COUNTS is set).

    `datasets` sends a HEAD request to count a download every time it loads a dataset, a packaged
    builder (`json`, so every local task) included, and waits up to 3 s for it. A machine without
    the internet that refuses the connection pays tens of milliseconds per task (32 ms here); one
    whose firewall drops the packet, as many compute nodes' do, pays the 3 s for every task.
    """
    if "HF_UPDATE_DOWNLOAD_COUNTS" not in os.environ:
        from datasets import config

        config.HF_UPDATE_DOWNLOAD_COUNTS = False


@contextlib.contextmanager
def templates_compiled_once() -> Iterator[None]:
    """Within the block lm-eval compiles each task template once, not at every use.

    lm-eval renders `doc_to_text`, `doc_to_target` and `doc_to_choice` as
    `env.from_string(template).render(**doc)`: a jinja compilation per document and per few-shot
    example, and the targets again at scoring (measured on bench_chain's first run: 1,402
    renders, 0.32 s of its 0.39 s of request building). Here each template is compiled once per
    jinja environment, lm-eval's own or the sandbox (`sandboxed_templates`), whichever is in
    force when it is rendered, and rendered as lm-eval renders it.
    """
    from lm_eval import utils

    plain = utils.apply_template
    compiled: dict[tuple[Any, str], Any] = {}

    def apply_template(template: str, doc: dict) -> str:
        key = (utils.env, template)
        if key not in compiled:
            compiled[key] = utils.env.from_string(template)
        return str(compiled[key].render(**doc))

    utils.apply_template = apply_template
    try:
        yield
    finally:
        utils.apply_template = plain


@contextlib.contextmanager
def sandboxed_templates(on: bool) -> Iterator[None]:
    """Within the block lm-eval renders task templates in jinja's sandbox (tasks a client named).

    lm-eval's own Jinja environment lets a template reach Python (`lipsum.__globals__`); the
    sandbox refuses such access and renders ordinary templates the same.
    """
    if not on:
        yield
        return
    from jinja2.sandbox import SandboxedEnvironment
    from lm_eval import utils

    plain = utils.env
    sandbox = SandboxedEnvironment(undefined=plain.undefined, keep_trailing_newline=plain.keep_trailing_newline)
    sandbox.filters.update({name: f for name, f in plain.filters.items() if name not in sandbox.filters})
    utils.env = sandbox
    try:
        yield
    finally:
        utils.env = plain
