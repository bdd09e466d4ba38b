"""Optional SQLite persistence of samples and alert transitions, so a long run's history outlives
the in-memory window and a crashed run's last minutes can still be read."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from evalfleet.monitoring.alerts import Alert
from evalfleet.monitoring.snapshot import MetricsSnapshot
from evalfleet.types import UsageError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (timestamp REAL NOT NULL, snapshot TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS samples_time ON samples (timestamp);
CREATE TABLE IF NOT EXISTS alerts (timestamp REAL NOT NULL, alert TEXT NOT NULL);
"""


class SampleStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as error:
            raise UsageError(f"cannot open the monitoring database {self.path}: {error}") from None
        self._lock = threading.Lock()

    def append(self, snapshot: MetricsSnapshot) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO samples VALUES (?, ?)", (snapshot.timestamp, snapshot.model_dump_json())
            )

    def append_alert(self, alert: Alert) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO alerts VALUES (?, ?)", (alert.cleared_at or alert.fired_at, alert.model_dump_json())
            )

    def samples(self, since: float | None = None, limit: int | None = None) -> list[MetricsSnapshot]:
        """Samples in time order; with `limit`, the most recent `limit` of them."""
        query = "SELECT snapshot FROM samples WHERE timestamp >= ? ORDER BY timestamp DESC"
        params: tuple[float, ...] | tuple[float, int] = (since if since is not None else float("-inf"),)
        if limit is not None:
            query += " LIMIT ?"
            params = (params[0], limit)
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        return [MetricsSnapshot.model_validate_json(row[0]) for row in reversed(rows)]

    def alerts(self) -> list[Alert]:
        """Every alert transition in order: a fired alert, then (if it cleared) the same alert with `cleared_at`."""
        with self._lock:
            rows = self._db.execute("SELECT alert FROM alerts ORDER BY rowid").fetchall()
        return [Alert.model_validate_json(row[0]) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
