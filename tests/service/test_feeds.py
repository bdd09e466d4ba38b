"""Event streams of one job share one poll of the store, made off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading

from evalfleet.orchestrator import JobState, JobStore
from evalfleet.service.feeds import JobFeeds
from evalfleet.service.fleet import Fleet


class CountingFleet(Fleet):
    def __init__(self, db_path) -> None:
        super().__init__(db_path)
        self.polls: list[str] = []

    def events_after(self, job_id, after):
        self.polls.append(threading.current_thread().name)
        return super().events_after(job_id, after)


def test_two_streams_of_one_job_share_one_poll_off_the_event_loop(tmp_path):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = store.add({"model": {"path": "demo"}, "tasks": {"names": ["demo_mc"]}}, priority="normal",
                        max_attempts=3)
    fleet = CountingFleet(db)
    feeds = JobFeeds(fleet)

    def finish() -> None:
        with JobStore(db) as store:
            store.transition(job, JobState.PLACED, placement=[(0, 0)])
            store.transition(job, JobState.RUNNING)
            store.update_progress(job, done=5, total=5)
            store.transition(job, JobState.SUCCEEDED)

    async def scenario() -> tuple[list, list, int]:
        a, b = feeds.follow(job), feeds.follow(job)
        first = await asyncio.gather(anext(a), anext(b))
        followers = feeds.feeds[job].followers
        await asyncio.to_thread(finish)
        return [first[0], *[e async for e in a]], [first[1], *[e async for e in b]], followers

    seen_a, seen_b, followers = asyncio.run(scenario())
    assert followers == 2 and feeds.feeds == {}  # one feed while both followed; gone once the job ended
    assert seen_a == seen_b
    states = [json.loads(e["data"])["to"] for e in seen_a if e["event"] == "state"]
    assert states == ["queued", "placed", "running", "succeeded"]
    assert [json.loads(e["data"]) for e in seen_a if e["event"] == "progress"][-1]["done"] == 5
    assert fleet.polls and threading.main_thread().name not in fleet.polls
