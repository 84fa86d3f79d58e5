"""Locust users for the guide's scenarios, talking only to the public HTTP, SSE and WebSocket APIs.

Scenarios (SCENARIOS maps each name to its user classes):
- basic: submit, follow progress over SSE, read the result ("Basic Functionality");
- priority: bursts of ten jobs with priorities 1..10 over two or more workers ("Multiple Workers");
- scale: submit as fast as possible with random priorities, five or more workers ("Scale Testing");
- resilience: steady submissions while workers and Redis are killed and restarted ("Resilience Testing";
  the disruptions come from loadtest.chaos, run beside the users);
- fanout: many SSE and WebSocket subscribers following the same few long jobs.
The runner (loadtest.runner) sets `environment.drill` (loadtest.drill.Drill) before users start. With the
locust command (`locust -f loadtest/locustfile.py ScaleUser --host ...`) a Drill is made at test start, but
nothing audits the run: prefer `bin/loadtest`.
"""

from __future__ import annotations

import random
import time
from typing import Any

import gevent
from locust import FastHttpUser, between, constant, events, task

from loadtest.drill import Drill
from loadtest.followers import follow_sse, follow_ws, timed_follow

FOLLOW_TIMEOUT_S = 60.0


@events.test_start.add_listener
def _drill_for_plain_locust(environment: Any, **_: Any) -> None:
    if not hasattr(environment, "drill"):
        environment.drill = Drill("locust", environment.host or "http://127.0.0.1:3001")


class DrillUser(FastHttpUser):
    """Submits jobs and records each one the API accepted."""

    abstract = True
    network_timeout = 30.0
    connection_timeout = 10.0

    @property
    def drill(self) -> Drill:
        drill: Drill = self.environment.drill
        return drill

    def submit(self, body: dict[str, Any]) -> str | None:
        started = time.time()
        with self.client.post("/api/jobs", json=body, name="submit", catch_response=True) as resp:
            job_id = None
            if resp.status_code == 201:
                try:
                    job_id = resp.json().get("job_id")
                except ValueError:
                    job_id = None
            if job_id:
                self.drill.accept(job_id, started, int(body.get("priority", 50)))
                resp.success()
                return str(job_id)
            kind = f"HTTP {resp.status_code}" if resp.status_code else type(resp.error).__name__
            self.drill.rejected[kind] += 1
            resp.failure(f"submit refused: {kind}")
        return None

    def read_job(self, job_id: str) -> dict[str, Any] | None:
        with self.client.get(f"/api/jobs/{job_id}", name="/api/jobs/[id]", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"read job: HTTP {resp.status_code}")
                return None
            job: dict[str, Any] = resp.json().get("job") or {}
            return job

    def wait_terminal(self, job_ids: list[str], timeout_s: float = FOLLOW_TIMEOUT_S) -> None:
        """Poll the jobs until all have ended (as a client without SSE would)."""
        left = list(job_ids)
        deadline = time.monotonic() + timeout_s
        while left and time.monotonic() < deadline:
            gevent.sleep(0.3)
            left = [j for j in left if (self.read_job(j) or {}).get("status") not in
                    ("completed", "failed", "timeout", "cancelled")]


class BasicUser(DrillUser):
    """Submit a job, follow its progress over SSE, then read its result."""

    wait_time = between(0.2, 1.0)

    @task
    def submit_follow_read(self) -> None:
        job_id = self.submit(self.drill.job_body(priority=100, action="test"))
        if job_id is None:
            return
        host, port = self.drill.host_port
        timed_follow(self.environment, "SSE", follow_sse, self.environment, host, port, job_id, FOLLOW_TIMEOUT_S)
        job = self.read_job(job_id)
        if job is not None and (job.get("status") != "completed" or "result" not in job):
            self.environment.events.request.fire(
                request_type="CHECK", name="result read back", response_time=0, response_length=0,
                exception=AssertionError(f"job {job_id} is {job.get('status')} without a result"), context={})


class PriorityUser(DrillUser):
    """The guide's loop: ten jobs with priorities 1..10, then wait for all of them."""

    wait_time = between(0.2, 0.5)

    @task
    def burst(self) -> None:
        ids = [self.submit(self.drill.job_body(priority=p, job_priority=p)) for p in range(1, 11)]
        self.wait_terminal([i for i in ids if i])


class ScaleUser(DrillUser):
    """As fast as possible, random priorities like the guide's $RANDOM."""

    wait_time = constant(0)

    @task
    def submit_one(self) -> None:
        self.submit(self.drill.job_body(priority=random.randint(0, 32767)))


class ResilienceUser(DrillUser):
    """Steady submissions (and health reads) while the chaos schedule disrupts the appliance."""

    wait_time = between(0.2, 0.8)

    @task(10)
    def submit_one(self) -> None:
        self.submit(self.drill.job_body(priority=random.randint(1, 1000)))

    @task(1)
    def health(self) -> None:
        with self.client.get("/health", name="/health", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"health: HTTP {resp.status_code}")


class FanoutProducer(DrillUser):
    """Keeps a few long jobs with many progress steps running for the subscribers to follow."""

    fixed_count = 1
    wait_time = constant(0.5)

    @task
    def produce(self) -> None:
        job_id = self.submit(self.drill.job_body(priority=100))
        if job_id:
            self.drill.live_jobs.append(job_id)


class _Subscriber(DrillUser):
    abstract = True
    wait_time = between(0.2, 1.0)

    def pick(self) -> str | None:
        """A job still running (the producer adds them, followers drop them when they end)."""
        jobs = list(self.drill.live_jobs)
        return random.choice(jobs) if jobs else None

    def ended(self, job_id: str, event: str | None) -> None:
        if event is not None and job_id in self.drill.live_jobs:
            self.drill.live_jobs.remove(job_id)


class SseSubscriber(_Subscriber):
    @task
    def follow(self) -> None:
        job_id = self.pick()
        if job_id:
            host, port = self.drill.host_port
            self.ended(job_id, timed_follow(self.environment, "SSE", follow_sse, self.environment, host, port,
                                            job_id, FOLLOW_TIMEOUT_S))


class WsSubscriber(_Subscriber):
    @task
    def follow(self) -> None:
        job_id = self.pick()
        if job_id:
            self.ended(job_id, timed_follow(self.environment, "WS", follow_ws, self.environment, self.drill.ws_url,
                                            job_id, FOLLOW_TIMEOUT_S))


SCENARIOS: dict[str, list[type[DrillUser]]] = {
    "basic": [BasicUser],
    "priority": [PriorityUser],
    "scale": [ScaleUser],
    "resilience": [ResilienceUser],
    "fanout": [FanoutProducer, SseSubscriber, WsSubscriber],
}
