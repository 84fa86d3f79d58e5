"""The Lua scripts against a real redis-server: ordering, FIFO at scale, concurrent claims, service filtering,
retries with backoff, stale workers, cancel, retention and listing."""

from __future__ import annotations

import multiprocessing
import random
from typing import Any

import orjson
import pytest
import redis

from appliance.errors import JobExists, JobFinished, JobLost, JobNotFound
from appliance.jobs import JobSpec
from appliance.keys import Keys
from appliance.queue import Queue
from appliance.scripts import ClaimResult, Completion, Scripts
from appliance.settings import QueueSettings
from procs import Listener

T0 = 1_800_000_000_000  # a fixed "now" (epoch ms) for scripts whose clock the tests drive
LEASE_MS = 20_000


SERVICES = ("sim", "other", "third", "a", "b", "simulation", "nope")


@pytest.fixture(autouse=True)
def offered(client: redis.Redis) -> None:
    """The services these tests submit to count as offered by a worker (at T0, which is later than the real
    now): their jobs wait in line. The tests of jobs nobody can serve remove this."""
    client.zadd(Keys().services_offered, dict.fromkeys(SERVICES, T0))


def submit(queue: Queue, job_id: str, service: str = "sim", priority: int = 50, max_retries: int = 3,
           now_ms: int = T0) -> str:
    queue.scripts.submit(job_id, service, priority, {"max_retries": str(max_retries), "payload": "{}"},
                         now_ms=now_ms)
    return job_id


def bulk_submit(queue: Queue, ids: list[str], service: str, priority: int, batch: int = 5000) -> None:
    """Submit many jobs through pipelines (the same script and keys as Scripts.submit, fewer round trips)."""
    for start in range(0, len(ids), batch):
        pipe = queue.client.pipeline(transaction=False)
        for job_id in ids[start:start + batch]:
            queue.scripts.submit_into(pipe, job_id, service, priority, {"max_retries": "3", "payload": "{}"},
                                      now_ms=T0)
        replies = pipe.execute()
        assert all(reply[0] == "ok" for reply in replies)


def claim(queue: Queue, worker_id: str = "w1", services: tuple[str, ...] = ("sim",), count: int = 1,
          now_ms: int = T0) -> ClaimResult:
    queues = [queue.keys.pending_service(s) for s in services]
    return queue.scripts.claim(worker_id, queues, count, LEASE_MS, now_ms)


def claim_ids(queue: Queue, **kwargs: Any) -> list[str]:
    return [job.id for job in claim(queue, **kwargs).jobs]


def drain(queue: Queue, worker_id: str = "w1", services: tuple[str, ...] = ("sim",), count: int = 1000,
          now_ms: int = T0) -> list[str]:
    """Claim until nothing is left; returns ids in claim order."""
    got: list[str] = []
    while True:
        ids = claim_ids(queue, worker_id=worker_id, services=services, count=count, now_ms=now_ms)
        if not ids:
            return got
        got += ids


def events(client: redis.Redis, keys: Keys, job_id: str) -> list[dict[str, str]]:
    return [fields for _, fields in client.xrange(keys.progress(job_id))]


# -- submission and ordering ----------------------------------------------------------------------------
def test_submit_stores_job_and_puts_it_in_line(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    submitted = queue.scripts.submit("j1", "sim", 7, {"max_retries": "2", "payload": '{"a":1}'}, now_ms=T0)
    assert submitted.seq == 1 and submitted.unworkable_reason == ""
    job = client.hgetall(k.job("j1"))
    assert job["id"] == "j1" and job["service_required"] == "sim" and job["priority"] == "7"
    assert job["status"] == "pending" and job["retry_count"] == "0" and job["max_retries"] == "2"
    assert job["queue"] == k.pending_service("sim")
    assert job["created_at"] == "2027-01-15T08:00:00.000Z"
    assert client.zrevrange(k.pending, 0, -1) == ["j1"]
    assert client.zrevrange(k.pending_service("sim"), 0, -1) == ["j1"]
    assert client.zscore(k.index_all, "j1") == 1
    assert client.zscore(k.index_status("pending"), "j1") == 1
    assert client.zscore(k.index_service("sim"), "j1") == 1
    assert client.smembers(k.services) == {"sim"}
    assert events(client, k, "j1")[0]["event"] == "submitted"
    with pytest.raises(JobExists):
        queue.scripts.submit("j1", "sim", 7, {}, now_ms=T0)
    assert client.zcard(k.pending) == 1


def test_higher_priority_first_then_earlier(queue: Queue, client: redis.Redis) -> None:
    plan = [("a", 5), ("b", 10), ("c", 5), ("d", 1_000_000), ("e", 0), ("f", 10), ("g", 999_999), ("h", 0)]
    for job_id, priority in plan:
        submit(queue, job_id, priority=priority)
    expected = ["d", "g", "b", "f", "a", "c", "e", "h"]
    # The guide's view (ZREVRANGE jobs:pending) shows the same order the claims follow.
    assert client.zrevrange(queue.keys.pending, 0, -1) == expected
    assert [claim_ids(queue)[0] for _ in plan] == expected
    assert claim_ids(queue) == []


def test_priority_zero_stays_zero(queue: Queue, client: redis.Redis) -> None:
    job_id = queue.submit(JobSpec.parse({"service_required": "sim", "priority": 0}))
    other = queue.submit(JobSpec.parse({"service_required": "sim", "priority": 1}))
    default = queue.submit(JobSpec.parse({"service_required": "sim"}))
    assert client.hget(queue.keys.job(job_id), "priority") == "0"
    job = queue.get(job_id)
    assert job is not None and job["priority"] == 0
    assert queue.get(default)["priority"] == 50  # type: ignore[index]
    assert drain(queue) == [default, other, job_id]


@pytest.mark.slow
def test_fifo_exact_for_100000_equal_priority_jobs(queue: Queue, client: redis.Redis) -> None:
    """No float rounding: 100,000 jobs of one priority come out exactly in submission order."""
    ids = [f"job-{n:06d}-{random.randrange(10**6):06d}" for n in range(100_000)]
    bulk_submit(queue, ids, "sim", 777)
    assert client.zcard(queue.keys.pending_service("sim")) == len(ids)
    got = drain(queue, count=2000)
    assert len(got) == len(ids)
    assert got == ids


def test_fifo_holds_at_the_priority_bounds(queue: Queue) -> None:
    """Scores at priority 0 and 1,000,000 keep every place exactly (largest score stays below 2^53)."""
    ids = [f"hi{n}" for n in range(50)] + [f"lo{n}" for n in range(50)]
    for job_id in ids[50:]:
        submit(queue, job_id, priority=0)
    for job_id in ids[:50]:
        submit(queue, job_id, priority=1_000_000)
    assert drain(queue, count=7) == ids


def test_claim_takes_many_in_order_and_records_the_hold(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    for n in range(5):
        submit(queue, f"j{n}", priority=n)
    client.hset(k.worker("w1"), mapping={"status": "idle", "current_jobs": 0})
    result = claim(queue, count=3)
    assert [job.id for job in result.jobs] == ["j4", "j3", "j2"]
    assert result.next_due_ms is None
    for job in result.jobs:
        assert job.attempt == "1"
        assert job.fields["status"] == "assigned" and job.fields["worker_id"] == "w1"
        assert client.zscore(k.leases, job.id) == T0 + LEASE_MS
        assert client.zscore(k.index_status("assigned"), job.id) is not None
        assert client.zscore(k.index_status("pending"), job.id) is None
        assert events(client, k, job.id)[-1]["event"] == "assigned"
    assert client.smembers(k.worker_jobs("w1")) == {"j4", "j3", "j2"}
    assert client.zrevrange(k.pending, 0, -1) == ["j1", "j0"]
    worker = client.hgetall(k.worker("w1"))
    assert worker["status"] == "busy" and worker["current_jobs"] == "3" and worker["current_job_id"] == "j2"


# -- concurrent claims from separate processes -----------------------------------------------------------
def _claimer(url: str, worker_id: str, start: Any, out: Any) -> None:
    """Runs in a spawned process: claim small batches with its own worker id until the queue is empty."""
    from appliance.redis_conn import connect

    client = connect(url)
    settings = QueueSettings(redis_url=url)
    keys = Keys()
    scripts = Scripts(client, keys, settings)
    got: list[str] = []
    start.wait(60)
    empty = 0
    while empty < 3:  # a few empty claims in a row: the queue is drained
        reply = scripts.claim(worker_id, [keys.pending_service("sim")], random.randint(1, 3), LEASE_MS)
        ids = [job.id for job in reply.jobs]
        empty = 0 if ids else empty + 1
        got += ids
    out.put((worker_id, got))
    client.close()


def test_concurrent_claims_from_four_processes(queue: Queue, client: redis.Redis, redis_server: str) -> None:
    ids = [f"c{n:05d}" for n in range(4000)]
    bulk_submit(queue, ids, "sim", 50)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(4)
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(redis_server, f"proc{n}", start, out)) for n in range(4)]
    for proc in procs:
        proc.start()
    try:
        results = dict(out.get(timeout=120) for _ in procs)
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    claimed = [job_id for got in results.values() for job_id in got]
    assert len(claimed) == len(set(claimed)), "a job was claimed twice"
    assert sorted(claimed) == ids, "a job was lost"
    assert sum(1 for got in results.values() if got) >= 2, "the claims did not overlap at all"
    k = queue.keys
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(k.job(job_id), "status", "worker_id", "attempt")
    owner = {job_id: worker for worker, got in results.items() for job_id in got}
    for job_id, (status, worker_id, attempt) in zip(ids, pipe.execute(), strict=True):
        assert (status, worker_id, attempt) == ("assigned", owner[job_id], "1")
    for worker, got in results.items():
        assert client.smembers(k.worker_jobs(worker)) == set(got)
        # each process claimed in queue order, so its own ids are increasing
        assert got == sorted(got)
    assert client.zcard(k.pending) == 0


# -- service filtering ------------------------------------------------------------------------------------
def test_worker_only_gets_services_it_serves(queue: Queue, client: redis.Redis) -> None:
    for n in range(5):
        submit(queue, f"other{n}", service="other", priority=1000)
    for n in range(3):
        submit(queue, f"sim{n}", service="sim", priority=1)
    submit(queue, "third0", service="third", priority=500)
    assert drain(queue, services=("sim",), count=2) == ["sim0", "sim1", "sim2"]
    assert client.zcard(queue.keys.pending_service("other")) == 5
    assert drain(queue, worker_id="w2", services=("third", "other"), count=1) == \
        ["other0", "other1", "other2", "other3", "other4", "third0"]


def test_claim_across_several_services_takes_the_best_head(queue: Queue) -> None:
    submit(queue, "a1", service="a", priority=5)
    submit(queue, "b1", service="b", priority=9)
    submit(queue, "a2", service="a", priority=9)
    submit(queue, "b2", service="b", priority=5)
    assert drain(queue, services=("a", "b"), count=10) == ["b1", "a2", "a1", "b2"]


@pytest.mark.slow
def test_servable_job_behind_100000_jobs_of_another_service(queue: Queue, client: redis.Redis) -> None:
    """Jobs the worker cannot serve cost its claim nothing, even 100,000 of them at a higher priority."""
    bulk_submit(queue, [f"o{n}" for n in range(100_000)], "other", 1_000_000)
    submit(queue, "mine", service="sim", priority=0)
    assert client.zrevrange(queue.keys.pending, -1, -1) == ["mine"]  # last in the global view
    assert claim_ids(queue, services=("sim",)) == ["mine"]
    assert claim_ids(queue, services=("sim",)) == []
    assert client.zcard(queue.keys.pending) == 100_000
    assert client.zcard(queue.keys.pending_service("other")) == 100_000


# -- failures, retries and backoff ------------------------------------------------------------------------
def test_failure_schedules_a_retry_with_its_due_time(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    submit(queue, "j1", max_retries=2)
    job = claim(queue).jobs[0]
    outcome = queue.scripts.fail("j1", "w1", job.attempt, "boom", retryable=True, delay_ms=5000, now_ms=T0 + 10)
    assert outcome.retrying and outcome.retry_count == 1 and outcome.due_ms == T0 + 5010
    assert client.zscore(k.delayed, "j1") == T0 + 5010
    assert client.zscore(k.leases, "j1") is None
    assert client.zcard(k.pending) == 0
    record = client.hgetall(k.job("j1"))
    assert record["status"] == "pending" and record["retry_count"] == "1"
    assert record["last_failed_worker"] == "w1" and record["error"] == "boom" and record["worker_id"] == ""
    assert record["retry_at"] == str(T0 + 5010)
    assert client.smembers(k.worker_jobs("w1")) == set()
    last = events(client, k, "j1")[-1]
    assert last["event"] == "retrying" and last["will_retry"] == "true" and last["retry_count"] == "1"

    early = claim(queue, worker_id="w2", now_ms=T0 + 5009)
    assert early.jobs == [] and early.next_due_ms == T0 + 5010
    assert client.zscore(k.delayed, "j1") == T0 + 5010

    due = claim(queue, worker_id="w2", now_ms=T0 + 5010)
    assert [j.id for j in due.jobs] == ["j1"] and due.next_due_ms is None
    assert due.jobs[0].attempt == "2" and due.jobs[0].fields["retry_count"] == "1"
    assert client.zscore(k.delayed, "j1") is None


def test_retries_end_in_failed_with_the_error(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    submit(queue, "j1", max_retries=2)
    now = T0
    for retry in (1, 2):
        job = claim(queue, worker_id=f"w{retry}", now_ms=now).jobs[0]
        outcome = queue.scripts.fail("j1", f"w{retry}", job.attempt, f"error {retry}", retryable=True,
                                     delay_ms=100, now_ms=now)
        assert outcome.retrying and outcome.retry_count == retry
        now += 100
    job = claim(queue, worker_id="w3", now_ms=now).jobs[0]
    outcome = queue.scripts.fail("j1", "w3", job.attempt, "final error", retryable=True, delay_ms=100, now_ms=now)
    assert not outcome.retrying and outcome.status == "failed"
    record = client.hgetall(k.job("j1"))
    assert record["status"] == "failed" and record["error"] == "final error"
    assert record["retry_count"] == "2" and record["last_failed_worker"] == "w3"
    assert client.zscore(k.delayed, "j1") is None and client.zcard(k.pending) == 0
    assert client.zscore(k.index_status("failed"), "j1") is not None
    assert client.hget(k.stats, "failed") == "1"
    kinds = [e["event"] for e in events(client, k, "j1")]
    assert kinds.count("retrying") == 2 and kinds[-1] == "failed" and "completed" not in kinds
    assert claim_ids(queue, now_ms=now + 10_000_000) == []


def test_max_retries_zero_means_no_retry(queue: Queue, client: redis.Redis) -> None:
    submit(queue, "j1", max_retries=0)
    job = claim(queue).jobs[0]
    outcome = queue.scripts.fail("j1", "w1", job.attempt, "boom", retryable=True, delay_ms=0, now_ms=T0)
    assert not outcome.retrying and outcome.status == "failed"
    assert client.hget(queue.keys.job("j1"), "retry_count") == "0"
    assert client.zcard(queue.keys.delayed) == 0


def test_non_retryable_failure_ends_at_once(queue: Queue, client: redis.Redis) -> None:
    submit(queue, "j1", max_retries=3)
    job = claim(queue).jobs[0]
    outcome = queue.scripts.fail("j1", "w1", job.attempt, "bad input", retryable=False, delay_ms=1000, now_ms=T0)
    assert not outcome.retrying and outcome.status == "failed"
    assert client.hget(queue.keys.job("j1"), "error") == "bad input"


def test_retried_job_keeps_its_priority_and_place(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    for job_id in ("a", "b", "c"):
        submit(queue, job_id, priority=50)
    submit(queue, "low", priority=10)
    first = claim(queue).jobs[0]
    assert first.id == "a"
    score = client.zscore(k.pending_service("sim"), "b")
    # retried at once (no backoff): back in line ahead of b and c
    queue.scripts.fail("a", "w1", first.attempt, "boom", retryable=True, delay_ms=0, now_ms=T0)
    assert client.zrevrange(k.pending, 0, -1) == ["a", "b", "c", "low"]
    assert client.zscore(k.pending_service("sim"), "b") == score
    again = claim(queue).jobs[0]
    assert again.id == "a" and again.fields["priority"] == "50"
    # retried after a backoff: put back at its own place when due
    queue.scripts.fail("a", "w1", again.attempt, "boom", retryable=True, delay_ms=1000, now_ms=T0)
    assert client.zrevrange(k.pending, 0, -1) == ["b", "c", "low"]
    assert drain(queue, now_ms=T0 + 1000, count=10) == ["a", "b", "c", "low"]


def test_release_hands_a_job_back_at_its_place_without_a_retry(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    submit(queue, "a")
    submit(queue, "b")
    job = claim(queue).jobs[0]
    queue.scripts.release("a", "w1", job.attempt, "worker shutting down", now_ms=T0)
    record = client.hgetall(k.job("a"))
    assert record["status"] == "pending" and record["retry_count"] == "0" and record["worker_id"] == ""
    assert events(client, k, "a")[-1]["event"] == "requeued"
    assert drain(queue, worker_id="w2") == ["a", "b"]


# -- holds: a worker that lost its job is refused --------------------------------------------------------
def test_stale_worker_updates_are_refused(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    submit(queue, "j1")
    stale = claim(queue, worker_id="w1").jobs[0]
    queue.scripts.progress("j1", "w1", stale.attempt, 10, "step 1", 1, 10, now_ms=T0)
    # w1 loses the job (it failed and was handed to w2 meanwhile)
    queue.scripts.fail("j1", "w1", stale.attempt, "boom", retryable=True, delay_ms=0, now_ms=T0)
    fresh = claim(queue, worker_id="w2").jobs[0]
    assert fresh.id == "j1" and fresh.attempt == "2"
    client.sadd(k.worker_jobs("w1"), "j1")  # as if w1 still believed it held the job
    with pytest.raises(JobLost):
        queue.scripts.progress("j1", "w1", stale.attempt, 50, "late", now_ms=T0)
    assert client.smembers(k.worker_jobs("w1")) == set()
    with pytest.raises(JobLost):
        queue.scripts.complete("j1", "w1", stale.attempt, {"late": True}, now_ms=T0)
    with pytest.raises(JobLost):
        queue.scripts.fail("j1", "w1", stale.attempt, "late", retryable=True, delay_ms=0, now_ms=T0)
    with pytest.raises(JobLost):
        queue.scripts.release("j1", "w1", stale.attempt, "late", now_ms=T0)
    # the same worker with an old attempt number is stale too
    with pytest.raises(JobLost):
        queue.scripts.complete("j1", "w2", stale.attempt, {"late": True}, now_ms=T0)
    record = client.hgetall(k.job("j1"))
    assert record["status"] == "assigned" and record["worker_id"] == "w2" and "result" not in record
    assert record["progress"] == "0"
    queue.scripts.complete("j1", "w2", fresh.attempt, {"ok": True}, now_ms=T0)
    assert client.hget(k.job("j1"), "status") == "completed"
    with pytest.raises(JobLost):
        queue.scripts.progress("j1", "w2", fresh.attempt, 100, now_ms=T0)
    with pytest.raises(JobNotFound):
        queue.scripts.complete("nope", "w2", "1", {}, now_ms=T0)


def test_expired_lease_is_recovered_and_the_stale_holder_refused(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    submit(queue, "j1", max_retries=1)
    stale = claim(queue, worker_id="w1").jobs[0]
    assert client.zscore(k.leases, "j1") == T0 + LEASE_MS
    assert queue.scripts.recover(now_ms=T0 + LEASE_MS - 1).jobs == 0
    assert client.hget(k.job("j1"), "status") == "assigned"
    assert queue.scripts.recover(now_ms=T0 + LEASE_MS, jitter=1.0).jobs == 1
    record = client.hgetall(k.job("j1"))
    assert record["status"] == "pending" and record["retry_count"] == "1" and record["last_failed_worker"] == "w1"
    # a lost worker's job backs off like any failed attempt (the first retry: the base step, jitter 1.0)
    due = T0 + LEASE_MS + queue.settings.retry_base_ms
    assert record["retry_at"] == str(due) and client.zscore(k.delayed, "j1") == due
    assert events(client, k, "j1")[-1]["retry_at"] == str(due)
    assert client.zcard(k.pending) == 0 and claim(queue, worker_id="w2", now_ms=due - 1).jobs == []
    fresh = claim(queue, worker_id="w2", now_ms=due).jobs[0]
    assert fresh.attempt == "2"
    # the stale holder learns it lost the job at its next heartbeat, and its writes are refused
    queue.scripts.register_worker("w1", 30, {}, now_ms=T0)
    beat = queue.scripts.heartbeat_worker("w1", 30, LEASE_MS, {}, {"j1": stale.attempt}, now_ms=T0 + LEASE_MS + 1)
    assert beat is not None and beat.lost == ["j1"]
    with pytest.raises(JobLost):
        queue.scripts.progress("j1", "w1", stale.attempt, 50, now_ms=T0 + LEASE_MS)
    with pytest.raises(JobLost):
        queue.scripts.complete("j1", "w1", stale.attempt, {"late": True}, now_ms=T0 + LEASE_MS)
    assert client.hget(k.job("j1"), "worker_id") == "w2"
    # no retries left: the next expiry ends the job
    assert queue.scripts.recover(now_ms=due + LEASE_MS).jobs == 1
    record = client.hgetall(k.job("j1"))
    assert record["status"] == "failed" and "worker lost" in record["error"]


def test_progress_then_complete(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    submit(queue, "j1")
    job = claim(queue).jobs[0]
    entry = queue.scripts.progress("j1", "w1", job.attempt, 40, "step 2/5", 2, 5, now_ms=T0)
    assert client.xrange(k.progress("j1"))[-1][0] == entry
    record = client.hgetall(k.job("j1"))
    assert record["status"] == "in_progress" and record["progress"] == "40" and record["started_at"]
    assert record["current_step"] == "2" and record["total_steps"] == "5"
    queue.scripts.complete("j1", "w1", job.attempt, {"answer": 42}, now_ms=T0)
    record = client.hgetall(k.job("j1"))
    assert record["status"] == "completed" and record["progress"] == "100" and record["result"] == '{"answer":42}'
    assert [e["event"] for e in events(client, k, "j1")] == \
        ["submitted", "assigned", "in_progress", "progress", "completed"]
    assert client.zscore(k.leases, "j1") is None
    assert client.hget(k.stats, "completed") == "1"


# -- cancel -----------------------------------------------------------------------------------------------
def test_cancel_pending_job(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    submit(queue, "j1")
    submit(queue, "j2")
    assert queue.scripts.cancel("j1", now_ms=T0) == "cancelled"
    record = client.hgetall(k.job("j1"))
    assert record["status"] == "cancelled" and record["error"] == "Job cancelled by user"
    assert client.zrevrange(k.pending, 0, -1) == ["j2"]
    assert client.zrevrange(k.pending_service("sim"), 0, -1) == ["j2"]
    assert client.zscore(k.index_status("cancelled"), "j1") is not None
    assert events(client, k, "j1")[-1]["event"] == "cancelled"
    assert drain(queue) == ["j2"]
    with pytest.raises(JobFinished):
        queue.scripts.cancel("j1", now_ms=T0)
    with pytest.raises(JobNotFound):
        queue.scripts.cancel("missing", now_ms=T0)


def test_cancel_a_job_waiting_for_its_retry(queue: Queue, client: redis.Redis) -> None:
    submit(queue, "j1")
    job = claim(queue).jobs[0]
    queue.scripts.fail("j1", "w1", job.attempt, "boom", retryable=True, delay_ms=1000, now_ms=T0)
    assert queue.scripts.cancel("j1", now_ms=T0) == "cancelled"
    assert client.zcard(queue.keys.delayed) == 0
    assert claim_ids(queue, now_ms=T0 + 10_000) == []


def test_cancel_running_job_ends_it_at_once_and_fences_its_worker(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    submit(queue, "j1")
    queue.scripts.register_worker("w7", 30, {"max_concurrent_jobs": "2"}, now_ms=T0)
    job = claim(queue, worker_id="w7").jobs[0]
    queue.scripts.progress("j1", "w7", job.attempt, 10, "step 1", now_ms=T0)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(k.cancels)
    try:
        pubsub.get_message(timeout=1)
        assert queue.scripts.cancel("j1", now_ms=T0) == "cancelling"
        message = pubsub.get_message(timeout=5)
        assert message is not None
        assert message["data"] in ('{"job_id":"j1","worker_id":"w7"}', '{"worker_id":"w7","job_id":"j1"}')
    finally:
        pubsub.close()
    record = client.hgetall(k.job("j1"))
    assert record["status"] == "cancelled" and record["error"] == "Job cancelled by user"
    assert client.zscore(k.leases, "j1") is None and client.smembers(k.worker_jobs("w7")) == set()
    assert client.hget(k.worker("w7"), "status") == "idle"
    # whatever the worker's attempt writes later (it was frozen, or cut off) is refused
    with pytest.raises(JobLost):
        queue.scripts.progress("j1", "w7", job.attempt, 50, "late", now_ms=T0 + 1)
    with pytest.raises(JobLost):
        queue.scripts.complete("j1", "w7", job.attempt, {"late": True}, now_ms=T0 + 1)
    with pytest.raises(JobLost):
        queue.scripts.fail("j1", "w7", job.attempt, "late", retryable=True, now_ms=T0 + 1)
    beat = queue.scripts.heartbeat_worker("w7", 30, LEASE_MS, {}, {"j1": job.attempt}, now_ms=T0 + 1)
    assert beat is not None and beat.lost == ["j1"]  # a worker that missed the message stops the job
    assert client.hget(k.job("j1"), "status") == "cancelled" and "result" not in client.hgetall(k.job("j1"))
    assert [e["event"] for e in events(client, k, "j1")][-2:] == ["progress", "cancelled"]
    with pytest.raises(JobFinished):
        queue.scripts.cancel("j1", now_ms=T0 + 2)


# -- retention of finished jobs ---------------------------------------------------------------------------
def test_terminal_jobs_expire_and_leave_the_indexes(client: redis.Redis, redis_server: str) -> None:
    settings = QueueSettings(redis_url=redis_server, completed_ttl_s=100, failed_ttl_s=300)
    queue = Queue(client, settings)
    k = queue.keys
    submit(queue, "done")
    submit(queue, "bad", max_retries=0)
    submit(queue, "gone")
    jobs = {job.id: job for job in claim(queue, count=2).jobs}
    queue.scripts.complete("done", "w1", jobs["done"].attempt, {}, now_ms=T0)
    queue.scripts.fail("bad", "w1", jobs["bad"].attempt, "boom", retryable=True, delay_ms=0, now_ms=T0)
    queue.scripts.cancel("gone", now_ms=T0)
    for job_id, ttl in (("done", 100), ("bad", 300), ("gone", 100)):
        assert 0 < client.ttl(k.job(job_id)) <= ttl and client.ttl(k.job(job_id)) >= ttl - 5
        assert 0 < client.ttl(k.progress(job_id)) <= ttl and client.ttl(k.progress(job_id)) >= ttl - 5
    assert client.zscore(k.expiry, "done\tcompleted\tsim") == T0 + 100_000
    assert client.zscore(k.expiry, "bad\tfailed\tsim") == T0 + 300_000

    assert queue.scripts.prune(now_ms=T0 + 99_999) == 0
    assert queue.scripts.prune(now_ms=T0 + 100_000) == 2
    for job_id in ("done", "gone"):
        assert client.zscore(k.index_all, job_id) is None
        assert client.zscore(k.index_service("sim"), job_id) is None
        assert not client.exists(k.job(job_id), k.progress(job_id))
    assert client.zcard(k.index_status("completed")) == 0 and client.zcard(k.index_status("cancelled")) == 0
    assert client.zscore(k.index_status("failed"), "bad") is not None
    assert queue.scripts.prune(now_ms=T0 + 300_000) == 1
    assert client.zcard(k.index_all) == 0 and client.zcard(k.expiry) == 0
    assert client.zcard(k.index_service("sim")) == 0 and client.zcard(k.index_status("failed")) == 0


def test_active_and_pending_jobs_never_expire(queue: Queue, client: redis.Redis) -> None:
    submit(queue, "a")
    submit(queue, "b")
    claim(queue)
    for job_id in ("a", "b"):
        assert client.ttl(queue.keys.job(job_id)) == -1
        assert client.ttl(queue.keys.progress(job_id)) == -1
    assert queue.scripts.prune(now_ms=T0 + 10**12) == 0


# -- listing ------------------------------------------------------------------------------------------------
def test_list_totals_filters_and_pages_newest_first(queue: Queue) -> None:
    ids = [queue.submit(JobSpec.parse({"service_required": "a" if n % 3 else "b", "priority": n}))
           for n in range(12)]
    a_ids = [job_id for n, job_id in enumerate(ids) if n % 3]
    b_ids = [job_id for n, job_id in enumerate(ids) if not n % 3]
    # the best two (priorities 11 and 10, both service a) get claimed and one completes
    first = claim(queue, services=("a",), count=2, now_ms=None)  # type: ignore[arg-type]
    assert [job.id for job in first.jobs] == [ids[11], ids[10]]
    queue.scripts.complete(ids[11], "w1", first.jobs[0].attempt, {"ok": 1})

    page, total = queue.list()
    assert total == 12 and [job["id"] for job in page] == ids[::-1]
    page, total = queue.list(limit=5, offset=0)
    assert total == 12 and [job["id"] for job in page] == ids[::-1][:5]
    page, total = queue.list(limit=5, offset=10)
    assert total == 12 and [job["id"] for job in page] == ids[::-1][10:]
    page, total = queue.list(limit=5, offset=12)
    assert total == 12 and page == []

    page, total = queue.list(status="pending")
    assert total == 10 and [job["id"] for job in page] == ids[9::-1]
    assert all(job["status"] == "pending" for job in page)
    page, total = queue.list(status="completed")
    assert total == 1 and page[0]["id"] == ids[11] and page[0]["result"] == {"ok": 1}
    page, total = queue.list(status="assigned")
    assert total == 1 and page[0]["id"] == ids[10]
    page, total = queue.list(status="failed")
    assert total == 0 and page == []

    page, total = queue.list(service="b")
    assert total == len(b_ids) and [job["id"] for job in page] == b_ids[::-1]
    page, total = queue.list(service="a", status="pending", limit=3, offset=1)
    pending_a = [job_id for job_id in a_ids if job_id not in (ids[11], ids[10])][::-1]
    assert total == len(pending_a) and [job["id"] for job in page] == pending_a[1:4]
    page, total = queue.list(service="nope")
    assert total == 0 and page == []
    assert not list(queue.client.scan_iter(match=queue.keys.scratch("*")))

    assert queue.counts()["pending"] == 10 and queue.counts()["completed"] == 1
    assert queue.depth() == 10


def test_complete_many_in_one_pipeline_is_idempotent_and_refuses_stale(queue: Queue, client: redis.Redis) -> None:
    for job_id in ("j1", "j2", "j3"):
        submit(queue, job_id)
    jobs = claim(queue, count=3).jobs
    client.script_flush()  # a Redis restarted without its script cache: the batch loads the script again
    done = [Completion(job.id, "w1", job.attempt, {"n": n}) for n, job in enumerate(jobs)]
    stale = Completion("j3", "w1", "99", {})
    assert queue.scripts.complete_many([*done[:2], stale], now_ms=T0) == ["ok", "ok", "lost"]
    assert queue.scripts.complete_many(done, now_ms=T0) == ["ok", "ok", "ok"], "a retried batch is a success"
    assert [client.hget(queue.keys.job(j), "status") for j in ("j1", "j2", "j3")] == ["completed"] * 3
    assert client.hget(queue.keys.stats, "completed") == "3"
    assert [f["event"] for _, f in client.xrange(queue.keys.progress("j1"))].count("completed") == 1


def test_a_batch_of_completions_updates_the_worker_once(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    for worker_id in ("w1", "w2"):
        queue.scripts.register_worker(worker_id, 30, {"services": "sim"}, now_ms=T0)
    for n in range(5):
        submit(queue, f"j{n}")
    mine = claim(queue, "w1", count=3).jobs
    theirs = claim(queue, "w2", count=2).jobs
    assert client.hget(k.worker("w1"), "current_jobs") == "3"
    batch = [Completion(mine[0].id, "w1", mine[0].attempt, {}), Completion(theirs[0].id, "w2", theirs[0].attempt, {}),
             Completion(mine[1].id, "w1", mine[1].attempt, {}), Completion("nope", "w1", "1", {})]
    assert queue.scripts.complete_many(batch, now_ms=T0) == ["ok", "ok", "ok", "not_found"], "codes in order"
    w1 = client.hgetall(k.worker("w1"))
    assert (w1["current_jobs"], w1["total_jobs_completed"], w1["status"]) == ("1", "2", "busy")
    assert client.smembers(k.worker_jobs("w1")) == {mine[2].id}
    queue.scripts.complete(mine[2].id, "w1", mine[2].attempt, {}, now_ms=T0)
    w1 = client.hgetall(k.worker("w1"))
    assert (w1["current_jobs"], w1["total_jobs_completed"], w1["status"]) == ("0", "3", "idle")
    assert client.hget(k.worker("w2"), "current_jobs") == "1"


@pytest.mark.parametrize("outcome", ["fail", "release"])
def test_a_cancel_flagged_while_running_wins_over_a_retry_or_a_hand_back(queue: Queue, client: redis.Redis,
                                                                         outcome: str) -> None:
    """A job whose cancel was only flagged (cancel_requested: how a running job's cancel was kept before the
    cancel ended it at once) still ends cancelled when its worker fails or hands it back."""
    submit(queue, "j1")
    job = claim(queue).jobs[0]
    client.hset(queue.keys.job("j1"), "cancel_requested", "2026-01-15T08:00:00.000Z")
    if outcome == "fail":
        result = queue.scripts.fail("j1", "w1", job.attempt, "boom", retryable=True, delay_ms=0, now_ms=T0)
        assert result.status == "cancelled" and not result.retrying
    else:
        queue.scripts.release("j1", "w1", job.attempt, "worker shutting down", now_ms=T0)
    assert client.hget(queue.keys.job("j1"), "status") == "cancelled"
    assert client.zrange(queue.keys.pending, 0, -1) == [] and claim_ids(queue, worker_id="w2") == []
    assert [f["event"] for _, f in client.xrange(queue.keys.progress("j1"))][-1] == "cancelled"


# -- wake-ups: one idle worker per arriving job -------------------------------------------------------------------
def register_workers(queue: Queue, *worker_ids: str, **fields: str) -> None:
    """Registered workers with 4 slots (a heartbeat, a hash), waking plainly unless given a lease_ms."""
    for worker_id in worker_ids:
        queue.scripts.register_worker(worker_id, 30, {"max_concurrent_jobs": "4", **fields}, now_ms=T0)


def idle_claim(queue: Queue, worker_id: str, count: int = 4) -> list[str]:
    """A worker's claim as the worker makes it (its services named, so an emptying claim makes it idle)."""
    result = queue.scripts.claim(worker_id, [queue.keys.pending_service("sim")], count, LEASE_MS, T0, ("sim",))
    return [job.id for job in result.jobs]


def test_a_job_wakes_one_idle_worker_and_a_full_one_passes_the_wake_on(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    register_workers(queue, "w1", "w2")
    listener = Listener(client, queue, ["w1", "w2", "w3"])
    assert idle_claim(queue, "w1") == [] and idle_claim(queue, "w2") == []
    assert client.smembers(k.idle_workers("sim")) == {"w1", "w2"}
    submit(queue, "j1")
    first = listener.woken()
    assert len(first) == 1 and first[0] in ("w1", "w2"), "one worker woken, not all"
    submit(queue, "j2")
    assert listener.woken() == [], "a queue that was not empty wakes nobody: whoever claims takes it"
    assert idle_claim(queue, first[0], count=1) == ["j1"], "a worker with one free slot leaves j2 behind"
    other = ({"w1", "w2"} - set(first)).pop()
    assert listener.woken() == [other], "so it wakes another idle worker for it"
    assert client.smembers(k.idle_workers("sim")) == set()
    assert idle_claim(queue, other) == ["j2"]
    assert client.smembers(k.idle_workers("sim")) == {other}, "emptied the queue with slots to spare: idle"


def test_a_wake_skips_workers_that_stopped_listening(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    register_workers(queue, "live", "gone-1", "gone-2")
    listener = Listener(client, queue, ["live"])
    assert idle_claim(queue, "gone-1") == [] and idle_claim(queue, "gone-2") == []  # neither listens
    submit(queue, "j1")
    assert client.smembers(k.idle_workers("sim")) == set(), "both tried (and dropped): nobody heard"
    assert idle_claim(queue, "live") == ["j1"]
    assert client.smembers(k.idle_workers("sim")) == {"live"}
    submit(queue, "j2")
    assert listener.woken() == ["live"]


def test_a_requirement_class_job_wakes_every_worker_of_its_service(queue: Queue, client: redis.Redis) -> None:
    listener = Listener(client, queue, ["w1"], services=("simulation",))
    queue.scripts.claim("w1", [queue.keys.pending_service("simulation")], 4, LEASE_MS, T0, ("simulation",))
    queue.submit(JobSpec.parse({"service_required": "simulation", "requirements": {"gpu_memory_gb": 1}}))
    assert listener.woken() == ["simulation"], "the service's channel, not one worker's"
    assert client.smembers(queue.keys.idle_workers("simulation")) == {"w1"}


def test_a_worker_that_cannot_read_a_service_queue_is_never_idle_for_it(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    assert idle_claim(queue, "w1") == []
    queue.scripts.claim("w1", [], 4, LEASE_MS, T0, ("sim",))  # its plan left out sim's own queue
    assert client.smembers(k.idle_workers("sim")) == set()
    assert idle_claim(queue, "w1") == []
    queue.scripts.leave_idle("w1", ["sim"])  # a draining worker
    assert client.smembers(k.idle_workers("sim")) == set()


def test_a_job_into_an_empty_queue_is_handed_to_the_idle_worker_it_wakes(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    register_workers(queue, "w1", lease_ms="5000")
    listener = Listener(client, queue, ["w1"])
    assert idle_claim(queue, "w1") == []
    submit(queue, "j1")
    [(channel, data)] = listener.messages()
    flat = orjson.loads(data)
    handed = dict(zip(flat[::2], flat[1::2], strict=True))
    assert (channel, handed["id"], handed["status"], handed["worker_id"], handed["attempt"]) == \
        (k.wake_worker("w1"), "j1", "assigned", "w1", "1"), "the wake-up carries the job, taken for w1"
    assert client.hgetall(k.job("j1")) == handed
    assert client.zscore(k.leases, "j1") == T0 + 5000, "under the worker's own lease"
    assert client.smembers(k.worker_jobs("w1")) == {"j1"} and client.zcard(k.pending) == 0
    assert client.hget(k.worker("w1"), "status") == "busy"
    assert [f["event"] for _, f in client.xrange(k.progress("j1"))] == ["submitted", "assigned"]
    assert client.smembers(k.idle_workers("sim")) == set(), "out of the idle set until it claims again"
    submit(queue, "j2")
    assert listener.messages() == [], "nobody idle: j2 waits for a claim"
    assert idle_claim(queue, "w1") == ["j2"]


def test_a_wake_skips_workers_without_a_heartbeat_or_a_free_slot(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    register_workers(queue, "silent", "full", "ok")
    client.delete(k.worker_heartbeat("silent"))  # its process died; its heartbeat ran out
    client.hset(k.worker("full"), "max_concurrent_jobs", "1")
    client.sadd(k.worker_jobs("full"), "some-job")  # a hand-off filled it after its claim
    listener = Listener(client, queue, ["silent", "full"])
    for worker_id in ("silent", "full"):
        client.sadd(k.idle_workers("sim"), worker_id)
    submit(queue, "j1")
    assert listener.woken() == [] and client.smembers(k.idle_workers("sim")) == set(), "both dropped"
    assert idle_claim(queue, "ok", count=1) == ["j1"]
