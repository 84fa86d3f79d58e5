"""The monitor socket against a real gunicorn: the Next.js monitor's flow and shapes, and the hub-era
simple monitor's pushed `stats_broadcast` (the shapes those monitors read)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance.queue import Queue
from live_api import Api, FakeWorker, iso_utc, recv, recv_until, running_api, send, ws_connect
from procs import env_for


@pytest.fixture(scope="module")
def api(redis_server: str) -> Iterator[Api]:
    with running_api(env_for(redis_server)) as running:
        yield running


def nextjs_monitor(api: Api, topics: list[str] | None = None) -> tuple[object, dict]:
    ws = ws_connect(api, "/ws/monitor/monitor-id-1796007902757?token=t")
    assert recv(ws)["type"] == "connected"
    send(ws, {"type": "monitor_connect", "monitor_id": "monitor-id-1796007902757", "request_full_state": True,
              "timestamp": 1796007902777})
    assert recv(ws)["type"] == "monitor_connected"
    snapshot = recv(ws)
    assert snapshot["type"] == "full_state_snapshot"
    send(ws, {"type": "subscribe", "monitor_id": "monitor-id-1796007902757",
              "topics": topics if topics is not None else ["workers", "jobs", "jobs:progress", "jobs:status",
                                                           "system_stats"], "timestamp": 1796007902777})
    subscribed = recv(ws)
    assert subscribed["type"] == "subscribed"
    return ws, snapshot


def test_snapshot_shape(api: Api, queue: Queue) -> None:
    done_worker = FakeWorker(queue, "gpu1")
    done = done_worker.submit(priority=5)
    done_worker.claim()
    done_worker.complete(done)
    failed = done_worker.submit(priority=1)
    done_worker.claim()
    done_worker.fail(failed, "simulated failure")
    worker = FakeWorker(queue, "gpu0")
    running = worker.submit(priority=60)
    worker.claim()
    worker.progress(running, 40)
    waiting = worker.submit(priority=10)
    ws, snapshot = nextjs_monitor(api)
    data = snapshot["data"]
    assert set(data["workers"]) == {"gpu0", "gpu1"}
    card = data["workers"]["gpu0"]
    assert card["status"] == "busy" and card["current_job_id"] == running
    assert card["capabilities"]["gpu_model"] == "RTX 4090" and card["capabilities"]["gpu_memory_gb"] == 24
    assert card["capabilities"]["services"] == ["simulation"] and card["capabilities"]["cpu_cores"] == 16
    assert data["workers"]["gpu1"]["jobs_completed"] == 1 and data["workers"]["gpu1"]["jobs_failed"] == 1
    jobs = data["jobs"]
    assert set(jobs) == {"pending", "active", "completed", "failed"}
    assert [(j["id"], j["status"], j["progress"]) for j in jobs["active"]] == [(running, "processing", 40)]
    assert jobs["active"][0]["worker_id"] == "gpu0" and jobs["active"][0]["job_type"] == "simulation"
    assert [(j["id"], j["status"], j["priority"]) for j in jobs["pending"]] == [(waiting, "pending", 10)]
    assert [j["id"] for j in jobs["completed"]] == [done]
    assert [(j["id"], j["status"], j["error"]) for j in jobs["failed"]] == [
        (failed, "failed", "simulated failure")]
    assert data["system_stats"]["total_workers"] == 2 and data["system_stats"]["pending_jobs"] == 1
    send(ws, {"type": "heartbeat", "monitor_id": "x", "timestamp": 1})
    assert recv_until(ws, "heartbeat_ack")[0]["monitor_id"] == "monitor-id-1796007902757"
    ws.close()


def test_nextjs_monitor_events(api: Api, queue: Queue) -> None:
    ws, _ = nextjs_monitor(api)
    worker = FakeWorker(queue, "w9")
    connected, _ = recv_until(ws, "worker_connected")
    assert connected["worker_id"] == "w9"
    assert connected["worker_data"]["capabilities"]["gpu_model"] == "RTX 4090"
    job_id = worker.submit(priority=60, workflow_id="wf-1")
    submitted, _ = recv_until(ws, "job_submitted")
    assert submitted["job_id"] == job_id
    assert submitted["job_data"]["job_type"] == "simulation" and submitted["job_data"]["priority"] == 60
    assert iso_utc(submitted["job_data"]["created_at"])
    worker.claim()
    worker.progress(job_id, 40)
    worker.complete(job_id, {"ok": True})
    second = worker.submit()
    worker.claim()
    worker.fail(second, "boom")
    kinds = [recv(ws) for _ in range(11)]
    queue.scripts.deregister_worker("w9")
    kinds.append(recv(ws))
    names = [m["type"] for m in kinds]
    assert names == ["job_assigned", "worker_status_changed", "job_status_changed", "job_progress",
                     "job_completed", "worker_status_changed", "job_submitted", "job_assigned",
                     "worker_status_changed", "job_failed", "worker_status_changed", "worker_disconnected"]
    progress = kinds[3]
    assert progress["progress"] == 40 and progress["worker_id"] == "w9" and progress["job_id"] == job_id
    assert kinds[4]["result"] == {"ok": True} and kinds[9]["error"] == "boom"
    assert all(iso_utc(m["timestamp"]) for m in kinds)
    ws.close()


def test_topic_filter(api: Api, queue: Queue) -> None:
    ws, _ = nextjs_monitor(api, ["jobs:progress"])
    worker = FakeWorker(queue, "w2")
    job_id = worker.submit()
    worker.claim()
    worker.progress(job_id, 10)
    worker.complete(job_id)
    marker = worker.submit()
    worker.claim()
    worker.progress(marker, 20)                         # the last event: everything else came before it
    got = []
    while True:
        message = recv(ws)
        got.append((message["type"], message.get("progress")))
        if message.get("job_id") == marker and message["type"] == "job_progress":
            break
    assert got == [("job_progress", 10), ("job_progress", 20)]
    ws.close()


def test_simple_monitor_gets_stats_broadcast_without_asking(api: Api, queue: Queue) -> None:
    worker = FakeWorker(queue, "fake-worker-gpu0")
    job_id = worker.submit(priority=5)
    worker.claim()
    worker.progress(job_id, 50)
    ws = ws_connect(api, "/ws/monitor/monitor-id-1")
    client = ws_connect(api, "/ws/client/client-id-1")
    recv(client)
    broadcast, _ = recv_until(ws, "stats_broadcast")
    assert "fake-worker-gpu0" in broadcast["connections"]["workers"]
    assert "client-id-1" in broadcast["connections"]["clients"]
    assert broadcast["workers"]["fake-worker-gpu0"]["status"] == "busy"
    assert broadcast["workers"]["fake-worker-gpu0"]["capabilities"]["services"] == ["simulation"]
    active = broadcast["system"]["jobs"]["active_jobs"]
    assert [(j["id"], j["status"], j["progress"], j["worker_id"]) for j in active] == [
        (job_id, "processing", 50, "fake-worker-gpu0")]
    assert iso_utc(active[0]["created_at"])
    assert broadcast["system"]["jobs"]["status"]["active"] == 1
    worker.progress(job_id, 75)
    update, _ = recv_until(ws, "update_job_progress")
    assert update["progress"] == 75
    send(ws, {"type": "request_stats", "id": "r1"})
    assert recv_until(ws, "response_stats")[0]["message_id"] == "r1"
    ws.close()
    client.close()


def test_monitor_resync_and_bad_subscribe(api: Api, queue: Queue) -> None:
    worker = FakeWorker(queue, "w3")
    worker.submit()
    ws, _ = nextjs_monitor(api)
    send(ws, {"type": "resync_request", "since_timestamp": 0, "max_events": 1})
    resync, _ = recv_until(ws, "resync_response")
    assert len(resync["events"]) == 1 and resync["has_more"] is True
    assert resync["events"][0]["type"] == "worker_connected"
    send(ws, {"type": "subscribe", "topics": "jobs"})
    assert recv_until(ws, "error")[0]["field"] == "topics"
    ws.close()
