"""The request cache: every computed result, in SQLite, committed before it counts as done.

A key is a hash of the model identity (resolved path, revision, dtype, a fingerprint of the
weight files) and of one token-level request. Rank, world size, batch size and layout are
never part of it, so a run resumed on another number of GPUs finds the same entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from evalfleet.runtime.backends.base import GenerationItem, Item
from evalfleet.types import EvalfleetError

FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model")
_SAMPLE_BYTES = 1 << 20


def default_cache_path() -> Path:
    explicit = os.environ.get("EVALFLEET_CACHE")
    if explicit:
        return Path(explicit)
    return Path(platformdirs.user_cache_dir("evalfleet")) / "requests.sqlite"


def _file_digest(path: Path) -> str:
    """Size plus the first and last MiB: cheap for 100 GB checkpoints, and changes when they do."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(_SAMPLE_BYTES))
        if size > 2 * _SAMPLE_BYTES:
            handle.seek(size - _SAMPLE_BYTES)
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def weights_fingerprint(model_path: str) -> str:
    folder = Path(model_path)
    if not folder.is_dir():
        return "remote"
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in FINGERPRINT_SUFFIXES)
    digest = hashlib.sha256()
    for path in files:
        digest.update(_file_digest(path).encode())
    return digest.hexdigest()[:32]


def model_identity(model_path: str, revision: str | None, dtype: str, backend: str = "hf") -> str:
    """The model part of every key. A backend other than transformers is named in it, since its
    numbers differ slightly (vLLM computes log-probs in float32 with its own kernels)."""
    resolved = str(Path(model_path).resolve()) if Path(model_path).exists() else model_path
    fields = {"path": resolved, "revision": revision, "dtype": dtype, "weights": weights_fingerprint(model_path)}
    if backend != "hf":
        fields["backend"] = backend
    return json.dumps(fields, sort_keys=True)


def request_key(identity: str, item: Item) -> str:
    kind = "generate" if isinstance(item, GenerationItem) else "loglikelihood"
    fields = asdict(item)
    if not fields.get("sampling", True):
        del fields["sampling"]  # greedy requests keep the keys they had before sampling existed
    payload = json.dumps([identity, kind, fields], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class RequestCache:
    """A thread-safe key → JSON result store. Each `put_many` is one committed transaction."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_cache_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        except (OSError, sqlite3.Error) as error:
            raise EvalfleetError(f"cannot open the request cache at {self.path}: {error}") from error
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT key, value FROM results WHERE key IN ({marks})", chunk)
                found.update((key, json.loads(value)) for key, value in rows)
        self.stats.hits += len(found)
        self.stats.misses += len(keys) - len(found)
        return found

    def put_many(self, entries: dict[str, Any]) -> None:
        if not entries:
            return
        rows = [(key, json.dumps(value)) for key, value in entries.items()]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO results (key, value) VALUES (?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        self.stats.writes += len(rows)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
