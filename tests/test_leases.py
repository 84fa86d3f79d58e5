"""Leases at the edges, on the Lua scripts: Redis away for longer than a lease, workers lost, the one retry curve,
a full Redis, and worker events as the scripts set them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import falcon.testing
import pytest
import redis

from appliance.api.app import create_app
from appliance.api.janitor import Janitor
from appliance.keys import Keys
from appliance.queue import Queue
from appliance.retry import is_outage
from appliance.settings import ApiSettings, QueueSettings

T0 = 1_800_000_000_000  # a fixed "now" (epoch ms) for the callers' clock; Redis's own clock (TIME) runs as it does
LEASE_MS = 20_000


def submit(queue: Queue, job_id: str, max_retries: int = 3, now_ms: int = T0) -> str:
    queue.scripts.submit(job_id, "sim", 50, {"max_retries": str(max_retries), "payload": "{}"}, now_ms=now_ms)
    return job_id


def claim(queue: Queue, worker_id: str, count: int = 1, now_ms: int = T0) -> list[str]:
    result = queue.scripts.claim(worker_id, [queue.keys.pending_service("sim")], count, LEASE_MS, now_ms)
    return [job.id for job in result.jobs]


def attempt(client: redis.Redis, keys: Keys, job_id: str) -> str:
    return str(client.hget(keys.job(job_id), "attempt"))


def register(queue: Queue, worker_id: str, now_ms: int = T0, **running: str) -> int:
    return queue.scripts.register_worker(worker_id, 30, {"max_concurrent_jobs": "4", "lease_ms": str(LEASE_MS)},
                                         now_ms=now_ms, running=running, lease_ms=LEASE_MS)


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def events(client: redis.Redis, keys: Keys) -> list[dict[str, str]]:
    return [fields for _, fields in client.xrange(keys.events)]


def refusal(call: Callable[[], object]) -> tuple[str, bool]:
    """The Redis error `call` raises, and whether it counts as an outage (kept from the test's frame: a held
    exception would keep the scripts' connections alive until a late garbage collection)."""
    try:
        call()
    except redis.RedisError as exc:
        return str(exc), is_outage(exc)
    raise AssertionError("no Redis error was raised")


# -- Redis away for longer than a lease -------------------------------------------------------------------------
def test_an_outage_moves_every_lease_on_by_its_length(queue: Queue, client: redis.Redis) -> None:
    """Redis away for 30 s (as the lease clock reads it, in Redis's own time): a lease that ran out meanwhile is
    moved on by the time beyond a third of a lease, so its holder still finishes the job, with no retry."""
    k = queue.keys
    register(queue, "w1")  # its lease (LEASE_MS, on its record) is what the silence is measured against
    submit(queue, "j1")
    assert claim(queue, "w1") == ["j1"]
    held = attempt(client, k, "j1")
    client.set(k.lease_clock, redis_ms(client) - 30_000)
    assert queue.scripts.recover(now_ms=T0 + LEASE_MS + 1).jobs == 0
    moved = client.zscore(k.leases, "j1")
    assert moved is not None
    away = 30_000 - LEASE_MS // 3
    assert T0 + LEASE_MS + away - 100 <= moved <= T0 + LEASE_MS + away + 100
    queue.scripts.complete("j1", "w1", held, {"ok": True}, now_ms=T0 + LEASE_MS + 1)
    record = client.hgetall(k.job("j1"))
    assert record["status"] == "completed" and record["retry_count"] == "0"


def test_a_late_heartbeat_moves_no_lease_back(queue: Queue, client: redis.Redis) -> None:
    """Redis frozen (SIGSTOP) runs the calls that waited in its input when it resumes, each with the clock of its
    sending: the first moves the leases on by the freeze, and a beat sent early in the freeze must not set them
    back to a deadline already past, nor its last beat, which a recovery sent later would judge lost."""
    k = queue.keys
    register(queue, "w1")
    submit(queue, "j1", max_retries=0)
    assert claim(queue, "w1") == ["j1"]
    held = attempt(client, k, "j1")
    client.set(k.lease_clock, redis_ms(client) - 30_000)
    assert queue.scripts.recover(now_ms=T0 + 1).jobs == 0  # the first script after the freeze
    moved = client.zscore(k.leases, "j1")
    assert moved is not None and moved > T0 + 2 * LEASE_MS
    beat = queue.scripts.heartbeat_worker("w1", 30, LEASE_MS, {}, {"j1": held}, now_ms=T0 + 1_000)  # sent early
    assert beat is not None and beat.lost == []
    assert client.zscore(k.leases, "j1") == moved
    recovery = queue.scripts.recover(now_ms=T0 + LEASE_MS + 5_000)  # sent late in the freeze
    assert recovery.jobs == 0 and recovery.dead_workers == []
    queue.scripts.heartbeat_worker("w1", 30, LEASE_MS, {}, {"j1": held}, now_ms=T0 + LEASE_MS + 6_000)
    assert client.hget(k.worker("w1"), "last_heartbeat_ms") == str(T0 + LEASE_MS + 6_000)
    queue.scripts.heartbeat_worker("w1", 30, LEASE_MS, {}, {"j1": held}, now_ms=T0 + 2_000)  # late again
    assert client.hget(k.worker("w1"), "last_heartbeat_ms") == str(T0 + LEASE_MS + 6_000)
    queue.scripts.complete("j1", "w1", held, {"ok": True}, now_ms=T0 + LEASE_MS + 7_000)
    record = client.hgetall(k.job("j1"))
    assert record["status"] == "completed" and record["retry_count"] == "0"


def test_a_claim_run_late_gets_a_lease_from_redis_s_time(queue: Queue, client: redis.Redis) -> None:
    """A claim that waited out a freeze in Redis's input holds its job for a lease from when it ran, not from
    when it was sent (its worker never got the reply; the job is given back as an orphan, no retry counted)."""
    k = queue.keys
    now = redis_ms(client)
    submit(queue, "j1", now_ms=now)
    client.set(k.lease_clock, now)
    assert claim(queue, "w1", now_ms=now - 60_000) == ["j1"]
    assert (client.zscore(k.leases, "j1") or 0) >= now + LEASE_MS


def test_an_outage_longer_than_the_heartbeat_ttl_reports_no_live_worker_lost(queue: Queue,
                                                                             client: redis.Redis) -> None:
    """Redis away for longer than the heartbeat TTL: the heartbeat keys expired meanwhile (a restart loads them
    expired, a frozen Redis expires them as it resumes). Heartbeats are judged like leases: moved on by the
    outage, an expired one set again for a lease, so no live worker is reported lost; one that really stopped is
    reported once that has run out, and at once when Redis was not away."""
    k = queue.keys
    register(queue, "w1")
    register(queue, "w2")
    client.pexpire(k.worker_heartbeat("w2"), 10_000)
    client.delete(k.worker_heartbeat("w1"))
    client.set(k.lease_clock, redis_ms(client) - 30_000)
    assert queue.scripts.recover(now_ms=T0).dead_workers == []
    assert client.exists(k.worker_heartbeat("w1"), k.worker_heartbeat("w2")) == 2
    assert 0 < client.pttl(k.worker_heartbeat("w1")) <= LEASE_MS
    assert client.pttl(k.worker_heartbeat("w2")) > 30_000
    assert [e for e in events(client, k) if e["event"] == "worker_disconnected"] == []
    client.delete(k.worker_heartbeat("w1"))  # w1 did not beat within that lease: it is gone
    assert queue.scripts.recover(now_ms=T0).dead_workers == ["w1"]
    assert [e["worker_id"] for e in events(client, k) if e["event"] == "worker_disconnected"] == ["w1"]


def test_a_short_silence_is_no_outage(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    submit(queue, "j1")
    claim(queue, "w1")
    client.set(k.lease_clock, redis_ms(client) - 1_000)  # less than a third of a lease: nobody missed a renewal
    assert queue.scripts.recover(now_ms=T0 + LEASE_MS).jobs == 1
    assert client.hget(k.job("j1"), "retry_count") == "1"


# -- lost workers ---------------------------------------------------------------------------------------------------
def test_a_lost_worker_is_retired_at_once_and_its_job_backs_off(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    register(queue, "w1")
    submit(queue, "j1", max_retries=2)
    submit(queue, "last", max_retries=0)
    assert claim(queue, "w1", count=2) == ["j1", "last"]
    now = T0 + LEASE_MS
    recovery = queue.scripts.recover(now_ms=now, jitter=0.0)
    assert recovery.jobs == 2 and recovery.dead_workers == ["w1"]
    assert not client.exists(k.worker("w1"), k.worker_heartbeat("w1"), k.worker_jobs("w1"))
    assert "w1" not in client.smembers(k.workers_active)
    gone = [e for e in events(client, k) if e["event"] == "worker_disconnected"]
    assert [(e["worker_id"], e["reason"]) for e in gone] == [("w1", "its lease expired: stopped renewing its lease")]
    # the job waits for its retry like any failed attempt: half the base step with no jitter
    due = now + queue.settings.retry_base_ms // 2
    assert client.zscore(k.delayed, "j1") == due and client.zcard(k.pending) == 0
    retrying = [e for e in events(client, k) if e.get("job_id") == "j1" and e["event"] == "retrying"]
    assert retrying[-1]["retry_at"] == str(due) and retrying[-1]["worker_id"] == "w1"
    last = client.hgetall(k.job("last"))
    assert last["status"] == "failed" and last["error"] == \
        "worker lost: w1 stopped renewing its lease, and no retries are left"
    assert claim(queue, "w2", now_ms=due) == ["j1"]


def test_a_live_worker_is_not_retired_for_a_job_it_dropped(queue: Queue, client: redis.Redis) -> None:
    """A worker that beats but does not renew one job (it never got its hand-off) loses the job, not its place."""
    k = queue.keys
    register(queue, "w1")
    submit(queue, "j1")
    claim(queue, "w1")
    beat = queue.scripts.heartbeat_worker("w1", 30, LEASE_MS, {}, {}, now_ms=T0 + LEASE_MS - 1)
    assert beat is not None and beat.orphans == {"j1": "1"}
    recovery = queue.scripts.recover(now_ms=T0 + LEASE_MS)
    assert recovery.jobs == 1 and recovery.dead_workers == []
    assert client.sismember(k.workers_active, "w1") and client.exists(k.worker("w1"))


def test_a_restarted_worker_recovers_what_its_predecessor_ran_and_keeps_its_own(queue: Queue,
                                                                                client: redis.Redis) -> None:
    k = queue.keys
    register(queue, "w1")
    submit(queue, "old")
    submit(queue, "own")
    assert claim(queue, "w1", count=2) == ["old", "own"]
    # the same process registers again (its record was lost) and runs "own": only "old" is recovered
    assert register(queue, "w1", now_ms=T0 + 100, own=attempt(client, k, "own")) == 1
    assert client.hget(k.job("old"), "status") == "pending" and client.zscore(k.delayed, "old") is not None
    assert client.hget(k.job("old"), "retry_count") == "1"
    assert client.hget(k.job("own"), "status") == "assigned"
    assert client.zscore(k.leases, "own") == T0 + 100 + LEASE_MS
    assert client.smembers(k.worker_jobs("w1")) == {"own"}
    assert client.hget(k.worker("w1"), "status") == "busy"


# -- one retry curve ------------------------------------------------------------------------------------------------
def test_a_worker_restarted_under_its_id_reports_its_predecessor_lost(queue: Queue, client: redis.Redis) -> None:
    """A worker killed (kill -9) and started again under the same id: monitors are told the old process is lost
    before the new one connects. The same process registering again (its record lost) is no loss."""
    k = queue.keys

    def register_as(pid: str) -> None:
        queue.scripts.register_worker("w1", 30, {"pid": pid, "hostname": "h", "lease_ms": str(LEASE_MS)},
                                      now_ms=T0, lease_ms=LEASE_MS)

    register_as("100")
    register_as("100")
    register_as("200")
    seen = [(e["event"], e.get("reason", "")) for e in events(client, k)
            if e["event"] in ("worker_connected", "worker_disconnected")]
    assert seen == [("worker_connected", ""), ("worker_connected", ""),
                    ("worker_disconnected", "restarted: its previous process ended without deregistering"),
                    ("worker_connected", "")]
    assert client.hget(k.worker("w1"), "pid") == "200" and client.sismember(k.workers_active, "w1")


def test_every_retry_follows_one_exponential_curve_with_jitter(queue: Queue, client: redis.Redis) -> None:
    base, cap = queue.settings.retry_base_ms, queue.settings.retry_max_ms
    submit(queue, "j1", max_retries=20)
    now = T0
    for retry in range(9):
        [job_id] = claim(queue, "w1", now_ms=now)
        jitter = retry % 2  # half the step, then all of it
        result = queue.scripts.fail(job_id, "w1", attempt(client, queue.keys, job_id), "boom", retryable=True,
                                    jitter=float(jitter), now_ms=now)
        step = min(cap, base * 2 ** retry)
        assert result.due_ms - now == (step if jitter else step // 2), retry
        now = result.due_ms


# -- a full Redis -----------------------------------------------------------------------------------------------
@pytest.fixture()
def fillable(client: redis.Redis) -> Iterator[None]:
    """The test may set a maxmemory (noeviction: writes that add memory are refused above it); reset after it."""
    policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
    client.config_set("maxmemory-policy", "noeviction")
    try:
        yield
    finally:
        client.config_set("maxmemory", 0)
        client.config_set("maxmemory-policy", policy)


def test_a_full_redis_refuses_new_jobs_but_never_running_work(queue: Queue, client: redis.Redis,
                                                              fillable: None) -> None:
    k = queue.keys
    register(queue, "w1")
    for job_id in ("run", "next", "cancel-me"):
        submit(queue, job_id, max_retries=1)
    claim(queue, "w1")
    client.config_set("maxmemory", 1)  # full
    message, outage = refusal(lambda: submit(queue, "new"))
    assert "maxmemory" in message and outage
    assert not client.exists(k.job("new"))
    # running work goes on: heartbeats and leases, progress, outcomes, claims of accepted jobs, cancels, recovery
    held = attempt(client, k, "run")
    assert queue.scripts.heartbeat_worker("w1", 30, LEASE_MS, {"telemetry": "{}"}, {"run": held}) is not None
    queue.scripts.progress("run", "w1", held, 50, "half", now_ms=T0)
    queue.scripts.complete("run", "w1", held, {"ok": True}, now_ms=T0)
    assert claim(queue, "w1") == ["next"]
    assert queue.scripts.fail("next", "w1", attempt(client, k, "next"), "boom", retryable=True).retrying
    assert queue.scripts.cancel("cancel-me") == "cancelled"
    queue.scripts.recover()
    register(queue, "w2")
    queue.scripts.deregister_worker("w2")
    assert client.hget(k.job("run"), "status") == "completed"
    client.config_set("maxmemory", 0)  # memory freed: new work is taken again
    submit(queue, "new")
    assert client.hget(k.job("new"), "status") == "pending"


# -- errors: outages or bugs ------------------------------------------------------------------------------------
def test_a_script_error_is_no_outage(queue: Queue, client: redis.Redis) -> None:
    client.set(queue.keys.leases, "not a sorted set")
    message, outage = refusal(lambda: claim(queue, "w1"))
    assert "WRONGTYPE" in message and not outage
    assert is_outage(redis.ConnectionError("Connection refused"))
    assert is_outage(redis.ResponseError("Error running script (call to f_1): @user_script:1: @user_script: 1: "
                                         "-OOM command not allowed when used memory > 'maxmemory'."))
    assert is_outage(redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"))
    assert not is_outage(redis.AuthenticationError("invalid password"))


# -- worker events as the scripts set them --------------------------------------------------------------------------
def test_worker_events_carry_the_status_each_script_set(queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    register(queue, "w1")
    submit(queue, "a")
    submit(queue, "b")
    claim(queue, "w1")
    claim(queue, "w1")
    queue.scripts.complete("a", "w1", attempt(client, k, "a"), {}, now_ms=T0)
    queue.scripts.fail("b", "w1", attempt(client, k, "b"), "boom", retryable=False, now_ms=T0)
    seen = [(e["event"], e.get("job_id") or e.get("current_job_id", ""), e.get("status"), e.get("current_jobs"))
            for e in events(client, k) if e["event"] in ("assigned", "completed", "failed", "worker_status")]
    assert seen == [
        ("assigned", "a", "assigned", None), ("worker_status", "a", "busy", "1"),
        ("assigned", "b", "assigned", None), ("worker_status", "b", "busy", "2"),
        ("completed", "a", "completed", None), ("worker_status", "b", "busy", "1"),
        ("failed", "b", "failed", None), ("worker_status", "", "idle", "0")]


# -- a script failing part-way ----------------------------------------------------------------------------------
def test_a_submit_that_fails_part_way_leaves_no_job_half_assigned(queue: Queue, client: redis.Redis,
                                                                   settings: QueueSettings) -> None:
    """jobs:leases of the wrong type: the submit that hands its job to an idle worker fails at the lease, before
    the job's record says `assigned` (Redis keeps a script's writes made before an error). The job waits in
    line, the API answers 500 naming the error (not 503: Redis is there), and once the key is fixed it runs."""
    k = queue.keys
    register(queue, "w1")
    listener = client.pubsub()
    listener.subscribe(k.wake_worker("w1"))
    assert listener.get_message(timeout=5) is not None  # subscribed
    # an idle worker (its claim emptied its queue), listening for its hand-off: a submit hands it the job
    assert queue.scripts.claim("w1", [k.pending_service("sim")], 1, LEASE_MS, T0, ["sim"]).jobs == []
    try:
        client.set(k.leases, "x")
        api = falcon.testing.TestClient(create_app(ApiSettings(queue=settings), queue))
        reply = api.simulate_post("/api/jobs", json={"service_required": "sim", "payload": {}})
        assert reply.status_code == 500, reply.json
        assert reply.json["success"] is False and "WRONGTYPE" in reply.json["error"]
        assert "not reachable" not in reply.json["error"]
        message, outage = refusal(lambda: claim(queue, "w2"))
        assert "WRONGTYPE" in message and not outage
        janitor = Janitor(queue)
        janitor.tick(1)  # not an outage: counted in the task's health, not skipped in silence
        assert janitor.errors >= 1 and "WRONGTYPE" in str(janitor.last_error)
    finally:
        listener.close()
    [job_id] = client.zrange(k.index_all, 0, -1)
    assert client.hget(k.job(job_id), "status") == "pending"
    assert not client.hget(k.job(job_id), "worker_id")
    client.delete(k.leases)
    assert claim(queue, "w2") == [job_id]


def test_a_held_job_without_a_lease_gets_one(queue: Queue, client: redis.Redis) -> None:
    """The safety net: a job assigned or in progress with no lease (a script that failed part-way) is given one
    by recovery; its holder renews it, or it runs out and the job is recovered like any other."""
    k = queue.keys
    submit(queue, "j1")
    claim(queue, "w1")
    client.zrem(k.leases, "j1")
    assert queue.scripts.recover(now_ms=T0).jobs == 0
    assert client.zscore(k.leases, "j1") is not None
    assert queue.scripts.recover(now_ms=T0 + 2 * LEASE_MS).jobs == 1
    assert client.hget(k.job("j1"), "status") == "pending"
