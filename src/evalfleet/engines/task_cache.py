"""lm-eval's built requests, kept on disk under a hash of everything they are built from.

Building requests (few-shot contexts, templates, choices) costs seconds for a large task and is
the same every time the same task runs. lm-eval can pickle them (`cache_requests`), but keys its
files by task name and shot count only, so an edited task or data file would be served stale.
Here each set of tasks gets its own folder, named by a hash of the task files, every file in
their folders and every absolute path they mention (name, size, modification time), the
lm-eval version, the few-shot count, limit and seed: a changed input means a new folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

_ABSOLUTE_PATH = re.compile(r"(/[^\s'\"]+)")


def file_stat(path: Path) -> list[Any]:
    info = path.stat()
    return [str(path), info.st_size, info.st_mtime_ns]


def mentioned_files(yaml_path: Path) -> set[Path]:
    """The existing files a task YAML names by absolute path (its data files, usually)."""
    return {Path(m) for m in _ABSOLUTE_PATH.findall(yaml_path.read_text(errors="replace")) if Path(m).is_file()}


def _task_files(yaml_path: Path) -> list[list[Any]]:
    files = {p for p in yaml_path.parent.iterdir() if p.is_file()} | mentioned_files(yaml_path)
    return [file_stat(p) for p in sorted(files)]


def tasks_hash(manager: Any, names: list[str], **settings: Any) -> str | None:
    """A hash of what the tasks' requests are built from; None when a task is not one YAML file."""
    described: list[Any] = [version("lm_eval"), settings]
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None or entry.yaml_path is None or entry.kind.name != "TASK":
            return None
        described.append([name, _task_files(Path(entry.yaml_path))])
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


@contextlib.contextmanager
def requests_cache(folder: Path | None, manager: Any, names: list[str], limit: int | None, **settings: Any) -> Iterator[bool]:
    """Within the block, lm-eval reads and writes built requests under `folder`/<hash>.

    Yields whether to pass `cache_requests=True`. Off with a `limit` (lm-eval then builds every
    document to fill its cache, which would make a short run long) or when no hash can be made.
    """
    key = tasks_hash(manager, names, **settings) if folder is not None and limit is None else None
    if key is None:
        yield False
        return
    from lm_eval.caching import cache

    saved = cache.PATH
    cache.PATH = str(folder / key)
    try:
        yield True
    finally:
        cache.PATH = saved
