"""SSE job progress against a real gunicorn: history replay, live events, Last-Event-ID, terminal close."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from appliance.queue import Queue
from live_api import Api, FakeWorker, running_api, sse
from procs import env_for, wait_for, workers


@pytest.fixture(scope="module")
def api(redis_server: str) -> Iterator[Api]:
    with running_api(env_for(redis_server)) as running:
        yield running


def test_late_subscriber_gets_whole_history_then_stream_ends(api: Api, queue: Queue) -> None:
    worker = FakeWorker(queue)
    job_id = worker.submit(priority=7)
    worker.claim()
    worker.progress(job_id, 25, "one", 1)
    worker.progress(job_id, 50, "two", 2)
    worker.complete(job_id, {"images": 2})

    stream = sse(api, job_id)
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    frames = stream.events()
    assert frames[0].event == "connected" and frames[0].data["job_id"] == job_id and frames[0].id is None
    events = frames[1:]
    assert [f.event for f in events] == ["submitted", "assigned", "in_progress", "progress", "progress",
                                         "completed"]
    assert [f.id for f in events] == worker.stream_ids(job_id)
    assert [f.data["progress"] for f in events] == [0, 0, 25, 25, 50, 100]
    assert events[3].data["message"] == "one" and events[3].data["current_step"] == 1
    assert events[-1].data["result"] == {"images": 2}
    assert all(f.data["type"] == f.event and "timestamp" in f.data for f in events)


def test_live_events_and_failed_job_ends_stream(api: Api, queue: Queue) -> None:
    worker = FakeWorker(queue)
    job_id = worker.submit()
    stream = sse(api, job_id)
    assert stream.next().event == "connected"
    assert stream.next().event == "submitted"
    worker.claim()
    assert stream.next().event == "assigned"
    worker.progress(job_id, 10)
    assert [stream.next().event, stream.next().event] == ["in_progress", "progress"]
    worker.fail(job_id, "connector exploded", retryable=False)
    last = stream.next()
    assert last.event == "failed" and last.data["error"] == "connector exploded"
    assert last.data["will_retry"] is False
    assert stream.next() is None


def test_retrying_is_not_terminal(api: Api, queue: Queue) -> None:
    worker = FakeWorker(queue)
    job_id = worker.submit(max_retries=2)
    worker.claim()
    worker.fail(job_id, "flaky", retryable=True)
    worker.claim()
    worker.progress(job_id, 50)
    worker.complete(job_id)
    names = [f.event for f in sse(api, job_id).events()[1:]]
    assert names == ["submitted", "assigned", "retrying", "assigned", "in_progress", "progress", "completed"]


def test_last_event_id_resumes_exactly_after_it(api: Api, queue: Queue) -> None:
    worker = FakeWorker(queue)
    job_id = worker.submit()
    worker.claim()
    for percent in (20, 40, 60):
        worker.progress(job_id, percent)
    ids = worker.stream_ids(job_id)
    stream = sse(api, job_id, last_event_id=ids[2])
    assert stream.next().data["resumed_after"] == ids[2]
    got = [stream.next().id for _ in ids[3:]]
    assert got == ids[3:]
    worker.progress(job_id, 80)
    worker.complete(job_id)
    rest = stream.events()
    assert [f.id for f in rest] == worker.stream_ids(job_id)[len(ids):]
    assert len(set(got + [f.id for f in rest])) == len(worker.stream_ids(job_id)) - 3


def test_resuming_after_the_terminal_event_ends_the_stream(api: Api, queue: Queue) -> None:
    """A browser EventSource reconnects with the terminal entry's id: it must get an end, not a stream forever."""
    worker = FakeWorker(queue)
    job_id = worker.submit()
    worker.claim()
    worker.complete(job_id)
    last = worker.stream_ids(job_id)[-1]
    frames = sse(api, job_id, last_event_id=last).events()
    assert [f.event for f in frames] == ["connected"]


@pytest.mark.parametrize("bad_id", ["1_0", "+5", "99999999999999999999999-0", "5-"])
def test_last_event_ids_redis_would_refuse_are_400(api: Api, queue: Queue, bad_id: str) -> None:
    job_id = FakeWorker(queue).submit()
    bad = sse(api, job_id, last_event_id=bad_id)
    assert bad.status == 400 and bad.body["field"] == "Last-Event-ID"


@pytest.mark.parametrize("beyond", ["18446744073709551615-18446744073709551614",
                                    "18446744073709551615-18446744073709551615"])
def test_a_last_event_id_beyond_the_stream_never_holds_back_other_followers(api: Api, queue: Queue,
                                                                            beyond: str) -> None:
    """The first follower of a job resumes from an id past the stream's end: it counts as the newest entry, so
    the process's shared cursor stays on what Redis holds, and a later follower still gets live events."""
    worker = FakeWorker(queue)
    job_id = worker.submit()
    first = sse(api, job_id, last_event_id=beyond)
    assert first.status == 200 and first.next().event == "connected"
    second = sse(api, job_id)
    assert [second.next().event, second.next().event] == ["connected", "submitted"]
    worker.claim()
    worker.complete(job_id)
    later = worker.stream_ids(job_id)[1:]
    assert [f.id for f in second.events()] == later and later
    assert [f.id for f in first.events()] == later


def test_keepalive_comment_while_idle(api: Api, queue: Queue) -> None:
    worker = FakeWorker(queue)
    job_id = worker.submit()
    stream = sse(api, job_id)
    assert [stream.next().event, stream.next().event] == ["connected", "submitted"]
    frame = stream.next()             # API_SSE_KEEPALIVE_SECONDS=0.5 in these tests
    assert frame is not None and frame.comment == "keepalive"
    stream.close()


def test_unknown_job_is_404_envelope_and_bad_last_event_id_400(api: Api, queue: Queue) -> None:
    stream = sse(api, "no-such-job")
    assert stream.status == 404
    assert stream.body["success"] is False and stream.body["error"] == "Job not found"
    worker = FakeWorker(queue)
    job_id = worker.submit()
    bad = sse(api, job_id, last_event_id="yesterday")
    assert bad.status == 400 and bad.body["field"] == "Last-Event-ID"


@pytest.mark.slow
def test_subscribers_on_several_processes_all_get_every_event(redis_server: str, queue: Queue) -> None:
    with running_api(env_for(redis_server), API_PROCESSES="2") as api2:
        worker = FakeWorker(queue)
        job_id = worker.submit()
        streams = [sse(api2, job_id) for _ in range(12)]
        for stream in streams:
            assert [stream.next().event, stream.next().event] == ["connected", "submitted"]
        # each process counts its own and the others' last published counts: wait for one answer that has all
        body = wait_for(lambda: (lambda got: got[1] if got[0] == 200 and got[1]["sse_connections"] == 12 else None)(
            api2.get_json("/api/connection-stats")), 10, "twelve SSE connections counted")
        assert body["total_connections"] >= 12
        worker.claim()
        for percent in range(10, 100, 10):
            worker.progress(job_id, percent)
        worker.complete(job_id)
        results: list[list[str | None]] = []

        def read(stream: object) -> None:
            results.append([f.id for f in stream.events()])  # type: ignore[attr-defined]

        threads = [threading.Thread(target=read, args=(s,)) for s in streams]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        expected = worker.stream_ids(job_id)[1:]
        assert len(results) == 12 and all(ids == expected for ids in results)


def test_real_worker_progress_reaches_sse_and_client_socket(api: Api, queue: Queue,
                                                            redis_server: str) -> None:
    from live_api import recv, send, ws_connect

    env = {**env_for(redis_server), "WORKER_SIMULATION_PROCESSING_TIME": "0.3", "WORKER_SIMULATION_STEPS": "3",
           "WORKER_HEARTBEAT_INTERVAL_MS": "500", "LOG_LEVEL": "warning"}
    ws = ws_connect(api, "/ws/client/real")
    recv(ws)
    send(ws, {"type": "submit_job", "job_type": "simulation", "payload": {"steps": 3}})
    job_id = recv(ws)["job_id"]
    stream = sse(api, job_id)
    assert [stream.next().event, stream.next().event] == ["connected", "submitted"]
    with workers(env, "sse-worker"):
        names = [f.event for f in stream.events()]
        assert names[0] == "assigned" and names[-1] == "completed"
        assert names.count("progress") >= 3
        kinds = []
        while not kinds or kinds[-1] != "complete_job":
            kinds.append(recv(ws)["type"])
        assert kinds[0] == "job_assigned" and "update_job_progress" in kinds
    ws.close()


def test_cancelled_pending_job_ends_stream(api: Api, queue: Queue) -> None:
    worker = FakeWorker(queue)
    job_id = worker.submit()
    stream = sse(api, job_id)
    assert [stream.next().event, stream.next().event] == ["connected", "submitted"]
    assert queue.cancel(job_id) == "cancelled"
    last = stream.next()
    assert last.event == "cancelled" and last.data["status"] == "cancelled"
    assert stream.next() is None
