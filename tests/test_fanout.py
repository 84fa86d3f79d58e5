"""Fan-out in one API process: hundreds of subscribers on few Redis connections; a slow client is closed
without holding back the others."""

from __future__ import annotations

import re
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
import redis

from appliance.queue import Queue
from live_api import Api, FakeWorker, running_api, sse
from procs import env_for, wait_for

SUBSCRIBERS = 300


@pytest.fixture(scope="module")
def api(redis_server: str) -> Iterator[Api]:
    with running_api(env_for(redis_server), API_CLIENT_QUEUE_SIZE="5") as running:
        yield running


def open_raw_sse(api: Api, job_id: str, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", api.port))
    sock.sendall(f"GET /api/jobs/{job_id}/progress HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return sock


def read_until(socks: list[socket.socket], marker: bytes, timeout_s: float) -> dict[socket.socket, bytes]:
    """Read every socket (without blocking on any one) until each has `marker` or is closed."""
    got = {sock: b"" for sock in socks}
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    waiting = set(socks)
    deadline = time.monotonic() + timeout_s
    while waiting and time.monotonic() < deadline:
        for key, _ in selector.select(0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data = sock.recv(65536)
            got[sock] += data
            if not data or marker in got[sock]:
                waiting.discard(sock)
                selector.unregister(sock)
    selector.close()
    return got


def api_connections(client: redis.Redis) -> int:
    """Redis connections other than this test process's own (told apart by their client-side ports)."""
    ours = {f"127.0.0.1:{c.laddr.port}" for c in psutil.Process().net_connections("tcp")}
    return sum(1 for c in client.client_list() if c["addr"] not in ours)


def test_hundreds_of_subscribers_few_redis_connections(api: Api, queue: Queue, client: redis.Redis) -> None:
    worker = FakeWorker(queue)
    job_id = worker.submit()
    baseline = api_connections(client)
    socks = [open_raw_sse(api, job_id) for _ in range(SUBSCRIBERS)]
    try:
        first = read_until(socks, b"event: submitted", 20)
        assert all(b"event: submitted" in data for data in first.values())
        wait_for(lambda: api.get_json("/api/connection-stats")[1]["sse_connections"] >= SUBSCRIBERS, 10,
                 "every subscriber counted")
        during = api_connections(client)
        worker.claim()
        for percent in range(10, 100, 10):
            worker.progress(job_id, percent)
        worker.complete(job_id)
        rest = read_until(socks, b"event: completed", 30)
        expected = worker.stream_ids(job_id)
        for sock in socks:
            ids = re.findall(rb"^id: (\S+)$", first[sock] + rest[sock], re.M)
            assert [i.decode() for i in ids] == expected
        # one blocking reader + a pool of at most 4 for history reads, plus the API's few request and script
        # connections
        assert during <= baseline + 6 and during <= 10, (baseline, during)
    finally:
        for sock in socks:
            sock.close()


def test_slow_client_is_closed_with_reason_and_others_get_everything(api: Api, queue: Queue) -> None:
    worker = FakeWorker(queue)
    job_id = worker.submit()
    slow = open_raw_sse(api, job_id, rcvbuf=4096)
    fast = sse(api, job_id)
    fast_frames: list[str] = []
    fast_progress = threading.Semaphore(0)   # released for each progress event the fast reader gets

    def read_fast() -> None:
        while (frame := fast.next()) is not None:
            if frame.comment is None:
                fast_frames.append(frame.event)
                if frame.event == "progress":
                    fast_progress.release()

    reader = threading.Thread(target=read_fast)
    reader.start()
    try:
        assert b"event: submitted" in read_until([slow], b"event: submitted", 10)[slow]
        slow.setblocking(True)
        worker.claim()
        big = "x" * 30_000
        for step in range(300):     # ~9 MB, more than socket buffers take; 1 event per batch, 5 batches queue
            worker.progress(job_id, step % 100, big, step)
            # the fast reader has this event before the next is written, so it never falls behind
            assert fast_progress.acquire(timeout=10), f"the fast reader did not get progress {step}"
        worker.complete(job_id)
        reader.join(30)
        assert fast_frames[-1] == "completed" and fast_frames.count("progress") == 300
        # the slow client's response read to its end (the last chunk), so a later `completed` would be in it
        tail = read_until([slow], b"\r\n0\r\n\r\n", 20)[slow]
        assert b"event: error" in tail and b"client too slow" in tail
        assert b"event: completed" not in tail
    finally:
        slow.close()
