"""The drills' audit finds what it claims to find: lost, twice-finished and stuck jobs, priority inversions."""

from __future__ import annotations

import redis

from appliance.jobs import JobSpec
from appliance.queue import Queue
from loadtest.audit import audit, check_order

LEASE_MS = 60_000


def _claim_and_complete(queue: Queue, job_id: str, worker: str = "w1") -> None:
    claimed = queue.scripts.claim(worker, [queue.keys.pending_service("simulation")], 1, LEASE_MS)
    assert [c.id for c in claimed.jobs] == [job_id]
    queue.scripts.complete(job_id, worker, claimed.jobs[0].attempt, {"ok": True})


def test_clean_run_passes(queue: Queue) -> None:
    ids = [queue.submit(JobSpec("simulation")) for _ in range(3)]
    for job_id in ids:
        _claim_and_complete(queue, job_id)
    result = audit(queue.client, queue.keys, ids)
    assert result.ok, result.summary()
    assert result.statuses["completed"] == 3 and result.per_worker["w1"] == 3
    assert len(result.queue_wait_ms) == 3 and len(result.end_to_end_ms) == 3


def test_finds_lost_stuck_and_twice_finished_jobs(queue: Queue, client: redis.Redis) -> None:
    done, twice, stuck, vanished, dropped = (queue.submit(JobSpec("simulation")) for _ in range(5))
    _claim_and_complete(queue, done)
    _claim_and_complete(queue, twice)
    # `twice` gets a second terminal event, as a duplicate run would write it
    client.xadd(queue.keys.progress(twice), {"job_id": twice, "event": "completed", "status": "completed",
                                             "updated_at": "2026-01-01T00:00:00.000Z"})
    client.delete(queue.keys.job(vanished))                       # accepted, then no record at all
    client.zrem(queue.keys.pending_service("simulation"), dropped)  # pending, but in no line any more
    result = audit(queue.client, queue.keys, [done, twice, stuck, vanished, dropped])
    assert not result.ok
    assert result.finished_twice == [twice] and result.completed_twice == [twice]
    assert result.stuck == [stuck]
    assert sorted(result.lost) == sorted([vanished, dropped])


def test_order_check_finds_an_inversion(queue: Queue, client: redis.Redis) -> None:
    since = "0-0"
    low = queue.submit(JobSpec("simulation", priority=1))
    high = queue.submit(JobSpec("simulation", priority=9))
    clean = check_order(client, queue.keys, [low, high], since)
    assert clean["inversions"] == 0
    # the claim script takes `high` first; a record saying `low` was taken while `high` waited is an inversion
    client.xadd(queue.keys.events, {"job_id": low, "event": "assigned", "worker_id": "w1"})
    found = check_order(client, queue.keys, [low, high], since)
    assert found["inversions"] == 1
    assert found["examples"][0]["claimed"] == low and found["examples"][0]["waiting"] == high


def test_order_check_follows_the_real_claims(queue: Queue, client: redis.Redis) -> None:
    ids = [queue.submit(JobSpec("simulation", priority=p)) for p in (3, 7, 7, 1, 9)]
    while True:
        claimed = queue.scripts.claim("w1", [queue.keys.pending_service("simulation")], 2, LEASE_MS)
        if not claimed.jobs:
            break
    result = check_order(client, queue.keys, ids, "0-0")
    assert result == {**result, "claims": 5, "inversions": 0, "checked": True}
