"""lm-eval's index of its built-in tasks, built once per installed lm-eval and kept on disk.

lm-eval's `TaskManager` parses every one of its ~14,000 task YAML files each time it is built
with its defaults: about 18 s of one core, paid by every process that names a built-in task
(`run`, `submit`'s counting, each job's worker) and by every misspelt task name. The index it
builds depends only on the installed files, so it is written once as JSON (data, never code)
and read back in about a tenth of the time.

The key is lm-eval's version and the SHA-256 of its installed file list (`RECORD`, which holds
a hash of every installed file): a reinstall or upgrade gets a new file. An install without a
`RECORD` (editable, from a source tree) is never cached. A file that cannot be read or does not
match is rebuilt; an index whose data would not come back unchanged from JSON is not written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from collections import defaultdict
from itertools import chain
from pathlib import Path
from typing import Any

import platformdirs

log = logging.getLogger(__name__)

FORMAT = 1
# What lm-eval 0.4's TaskManager derives from its index (set here as its constructor sets them).
_MANAGER_FIELDS = ("_index", "_all_tasks", "_all_subtasks", "_all_groups", "_all_tags")


def index_folder() -> Path:
    """`$EVALFLEET_TASK_INDEX`, else `lm-eval-index/` in the user's cache folder."""
    explicit = os.environ.get("EVALFLEET_TASK_INDEX")
    return Path(explicit) if explicit else Path(platformdirs.user_cache_dir("evalfleet")) / "lm-eval-index"


def install_key() -> str | None:
    """lm-eval's version and a hash of its installed files, or None where they are unknown."""
    try:
        distribution = importlib.metadata.distribution("lm_eval")
        record = distribution.read_text("RECORD")
    except (importlib.metadata.PackageNotFoundError, OSError):
        return None
    if not record or "lm_eval/tasks/" not in record:
        return None
    return f"{distribution.version}-{hashlib.sha256(record.encode()).hexdigest()[:16]}"


def _rows(index: dict[str, Any]) -> list[list[Any]]:
    return [[entry.name, entry.kind.name, None if entry.yaml_path is None else str(entry.yaml_path), entry.cfg,
             sorted(entry.tags)] for entry in index.values()]


def _entries(rows: list[list[Any]]) -> dict[str, Any]:
    from lm_eval.tasks._index import Entry, Kind

    return {name: Entry(name=name, kind=Kind[kind], yaml_path=None if path is None else Path(path), cfg=cfg,
                        tags=set(tags)) for name, kind, path, cfg, tags in rows}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
        if document.get("format") != FORMAT:
            return None
        return _entries(document["entries"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("lm-eval's task index in %s is unreadable (%s); it is rebuilt", path, error)
        return None


def _write(path: Path, index: dict[str, Any]) -> None:
    rows = _rows(index)
    try:
        text = json.dumps({"format": FORMAT, "entries": rows})
    except (TypeError, ValueError):
        return  # something in a task's config is not plain data: keep building it each time
    if json.loads(text)["entries"] != rows:
        return  # JSON would change it (a key that is not a string): not cached
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            handle.write(text)
        os.replace(handle.name, path)
    except OSError as error:  # a read-only or full cache folder costs time, never the run
        log.warning("lm-eval's task index could not be kept in %s: %s", path.parent, error)


def builtin_index() -> dict[str, Any]:
    """lm-eval's built-in tasks, groups and tags by name, as its `TaskIndex` builds them."""
    import lm_eval.tasks
    from lm_eval.tasks._index import TaskIndex

    key = install_key()
    path = index_folder() / f"{key}.json" if key else None
    if path is not None and path.exists() and (index := _read(path)) is not None:
        return index
    index = TaskIndex.build([Path(lm_eval.tasks.__file__).parent])
    if path is not None:
        _write(path, index)
    return index


def task_manager(include_paths: list[Path], metadata: dict) -> Any:
    """lm-eval's `TaskManager` over its built-in tasks and `include_paths`, the built-ins read from
    the kept index. As in lm-eval, a name in an include path overrides a built-in one."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    manager = TaskManager(include_path=include_paths, include_defaults=False, metadata=metadata)
    if not all(hasattr(manager, name) for name in _MANAGER_FIELDS):  # another lm-eval: let it index itself
        return TaskManager(include_path=include_paths, include_defaults=True, metadata=metadata)
    index = {**builtin_index(), **manager.task_index}
    kinds: dict[Any, list[str]] = defaultdict(list)
    for name, entry in index.items():
        kinds[entry.kind].append(name)
    manager._index = index
    manager._all_tasks = sorted(index)
    manager._all_subtasks = sorted(chain(kinds[Kind.TASK], kinds[Kind.PY_TASK]))
    manager._all_groups = sorted(kinds[Kind.GROUP])
    manager._all_tags = sorted(kinds[Kind.TAG])
    return manager
