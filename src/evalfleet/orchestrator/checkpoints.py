"""Checkpoints a trainer writes: their training step, whether one is complete, and its fingerprint.

- `checkpoint_step` reads the step from a folder name (`step-1000`, `step_1000`, `checkpoint-1000`,
  `iter_0001000`, `global_step1000`) or from a user's regex with one group.
- `completeness` says whether a folder is done being written: a marker file the trainer writes
  last, else its files stopped changing for a quiet period and it holds a loadable model.
- `fingerprint` is cheap (names, sizes, mtimes of the files); a different fingerprint after an
  evaluation means the checkpoint was rewritten while it was being evaluated.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from evalfleet.types import UsageError

_STEP_PATTERNS = (
    re.compile(r"^(?:.*[-_])?(?:step|checkpoint|ckpt|iter|iteration)[-_]?0*(\d+)$", re.IGNORECASE),
    re.compile(r"^global[-_]?step[-_]?0*(\d+)$", re.IGNORECASE),
)

# Files trainers (or their wrappers) write last, when a checkpoint is whole.
DEFAULT_MARKERS = (".complete", "COMPLETE", "done", "DONE", ".done", "_SUCCESS")

# Weight files transformers' `from_pretrained` loads; the config sits beside them.
_WEIGHT_GLOBS = ("model*.safetensors", "pytorch_model*.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# What transformers' Trainer saves to resume training; not read by an evaluation.
_TRAINER_STATE = frozenset({"optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin"})
_TRAINER_STATE_PREFIXES = ("rng_state",)


def checkpoint_step(path: str | os.PathLike[str], pattern: str | None = None) -> int | None:
    """The training step in a checkpoint folder's name, or None when the name holds none.

    `pattern` is a regex with one group matched against the folder's name (search, not fullmatch).
    """
    name = Path(path).name
    if pattern is not None:
        found = re.search(pattern, name)
        if found is None or not found.groups() or found.group(1) is None:
            return None
        try:
            return int(found.group(1))
        except ValueError:
            return None
    for compiled in _STEP_PATTERNS:
        found = compiled.match(name)
        if found:
            return int(found.group(1))
    return None


def check_step_regex(pattern: str) -> None:
    """A UsageError unless `pattern` is a regex with exactly one group (the step)."""
    try:
        groups = re.compile(pattern).groups
    except re.error as error:
        raise UsageError(f"--step-regex {pattern!r} is not a regular expression: {error}") from None
    if groups != 1:
        raise UsageError(f"--step-regex {pattern!r} must have exactly one group (the step); it has {groups}")


def _is_marker(name: str, markers: tuple[str, ...]) -> bool:
    return name in markers or name in DEFAULT_MARKERS


def _model_files(folder: Path, markers: tuple[str, ...] = ()) -> list[os.DirEntry[str]]:
    """The folder's own files that an evaluation reads: not markers, not the trainer's resume state."""
    with os.scandir(folder) as entries:
        return [e for e in entries if e.is_file(follow_symlinks=True) and not _is_marker(e.name, markers)
                and e.name not in _TRAINER_STATE and not e.name.startswith(_TRAINER_STATE_PREFIXES)]


def fingerprint(folder: str | os.PathLike[str], markers: tuple[str, ...] = ()) -> str | None:
    """Names, sizes and modification times of the model's files, hashed; None when the folder is gone.

    Markers and the trainer's resume state (optimizer, scheduler, RNG) are left out: writing a marker, or
    a trainer pruning its optimizer state, is not a new model.
    """
    try:
        entries = _model_files(Path(folder), markers)
    except (FileNotFoundError, NotADirectoryError):
        return None
    listed = []
    for entry in entries:
        try:
            stat = entry.stat()
        except FileNotFoundError:  # removed since the folder was listed
            continue
        listed.append((entry.name, stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(repr(sorted(listed)).encode()).hexdigest()[:16]


def missing_for_loading(folder: str | os.PathLike[str]) -> str | None:
    """What keeps `from_pretrained` from loading the folder now (None: nothing): no config.json, no
    weights, a shard the index names but the folder lacks, or a safetensors file not fully written."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return "no config.json yet"
    index = next((folder / name for name in _WEIGHT_INDEXES if (folder / name).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return f"{index.name} is not a whole index yet"
        weights = [folder / shard for shard in shards]
        absent = [w.name for w in weights if not w.is_file()]
        if absent:
            return f"shard {absent[0]} not written yet"
    else:
        weights = sorted(p for pattern in _WEIGHT_GLOBS for p in folder.glob(pattern))
        if not weights:
            return "no weights yet"
    for weight in weights:
        if weight.suffix == ".safetensors":
            try:
                with safe_open(str(weight), "numpy"):  # reads the header only; numpy spares importing torch
                    pass
            except (SafetensorError, OSError):
                return f"{weight.name} is not whole yet"
    return None


@dataclass(frozen=True)
class Completeness:
    complete: bool
    why: str
    """How it was decided, for the watcher's log line."""


def completeness(folder: str | os.PathLike[str], *, marker: str | None, unchanged_s: float,
                 quiet_s: float, rewritten: bool = False) -> Completeness:
    """Whether the checkpoint in `folder` is whole.

    With `marker`, only that file says so. Without, one of `DEFAULT_MARKERS` does; else its model files
    must have stayed the same for `quiet_s` (`unchanged_s`: how long they have, as the caller observed
    them) and it must hold a loadable model. A `rewritten` checkpoint must be quiet too: its marker may
    be the one its first write left.
    """
    folder = Path(folder)
    quiet = unchanged_s >= quiet_s
    if rewritten and not quiet:
        return Completeness(False, f"files changed {unchanged_s:.1f}s ago, {quiet_s:g}s of quiet needed")
    markers = (marker,) if marker else DEFAULT_MARKERS
    found = next((m for m in markers if (folder / m).is_file()), None)
    if found is not None:
        return Completeness(True, f"marker {found}")
    if marker:
        return Completeness(False, f"no {marker} marker yet")
    if not quiet:
        return Completeness(False, f"files changed {unchanged_s:.1f}s ago, {quiet_s:g}s of quiet needed")
    missing = missing_for_loading(folder)
    if missing is not None:
        return Completeness(False, missing)
    return Completeness(True, f"unchanged for {quiet_s:g}s with config.json and weights")


class QuietClock:
    """How long each folder's fingerprint has stayed the same, as seen by this process's looks at it."""

    def __init__(self) -> None:
        self._since: dict[str, tuple[str | None, float]] = {}

    def unchanged_for(self, path: str, print_: str | None, now: float) -> float:
        seen = self._since.get(path)
        if seen is None or seen[0] != print_:
            self._since[path] = (print_, now)
            return 0.0
        return now - seen[1]

    def forget(self, path: str) -> None:
        self._since.pop(path, None)
