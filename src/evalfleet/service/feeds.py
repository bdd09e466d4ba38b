"""One poll of the store per followed job, however many event streams follow it.

Every `GET /jobs/{id}/events` stream of a job reads from one `JobFeed`: a task that polls the
store off the event loop (in a worker thread) and keeps the job's state changes and latest
record, so ten dashboards on one job cost one query per tick, and a slow store never stalls
the event loop. The feed stops when the job has ended or its last follower has gone.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

from evalfleet.orchestrator.store import JobRecord
from evalfleet.service.fleet import Fleet

EVENT_POLL_S = 0.5


class JobFeed:
    """A job's state changes (all of them, oldest first) and its record as of the latest poll."""

    def __init__(self, fleet: Fleet, job_id: str) -> None:
        self.fleet, self.job_id = fleet, job_id
        self.changes: list[dict[str, Any]] = []
        self.record: JobRecord | None = None
        self.ended = False
        self.error: Exception | None = None
        self.followers = 0
        self.polls = 0
        self._polled = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._poll())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _poll(self) -> None:
        seen = 0
        while not self.ended:
            try:
                record, changes = await asyncio.to_thread(self.fleet.events_after, self.job_id, seen)
            except sqlite3.Error:  # a store busy past its timeout: the next tick reads again
                await asyncio.sleep(EVENT_POLL_S)
                continue
            except Exception as error:  # anything else ends the streams, which say why
                async with self._polled:
                    self.error, self.ended = error, True
                    self.polls += 1
                    self._polled.notify_all()
                return
            if changes:
                seen = changes[-1]["id"]
            async with self._polled:
                self.changes.extend(changes)
                self.record = record
                self.ended = record.state.terminal  # this poll came after the job's last change
                self.polls += 1
                self._polled.notify_all()
            if not self.ended:
                await asyncio.sleep(EVENT_POLL_S)

    async def follow(self) -> AsyncIterator[dict[str, str]]:
        """`state` events (every change since submit), `progress` events when it moves, until the job ends."""
        sent, polls, last = 0, 0, None
        while True:
            async with self._polled:
                await self._polled.wait_for(lambda: self.polls > polls)
                polls, changes, record, ended = self.polls, self.changes[sent:], self.record, self.ended
            if self.error is not None:
                raise self.error
            sent += len(changes)
            for change in changes:
                yield {"event": "state", "data": json.dumps({k: v for k, v in change.items() if k != "id"})}
            progress = {"done": record.done, "total": record.total, "tokens_per_s": record.tokens_per_s}
            if progress != last and record.total:
                last = progress
                yield {"event": "progress", "data": json.dumps(progress)}
            if ended:
                return


class JobFeeds:
    """The feeds of the jobs being followed now, one per job."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.feeds: dict[str, JobFeed] = {}

    async def follow(self, job_id: str) -> AsyncIterator[dict[str, str]]:
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = JobFeed(self.fleet, job_id)
            feed.start()
        feed.followers += 1
        try:
            async for event in feed.follow():
                yield event
        finally:
            feed.followers -= 1
            if feed.followers == 0 and self.feeds.get(job_id) is feed:
                del self.feeds[job_id]
                feed.stop()
