"""The ComfyUI connector against the protocol-faithful double (tests/comfyui_double.py): normal run, cached
rerun, runtime error, 400, interrupt, delete while pending, dropped socket, previews, health, basic auth,
timeout; the double's routing rules; and a real worker process running a ComfyUI job end to end."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import falcon.testing
import pytest
import redis
import websocket

from appliance.api.app import create_app
from appliance.connector import ConnectorError, JobContext, JobStopped
from appliance.jobs import JobSpec
from appliance.queue import Queue
from appliance.settings import ApiSettings, QueueSettings, WorkerSettings
from appliance.worker import Worker
from comfyui_double import ComfyDouble
from connectors.comfyui import ComfyUIConnector
from procs import wait_alive, worker_process


def workflow(steps: int = 4, step_s: float = 0.02, seed: int = 1, **test_node: Any) -> dict[str, Any]:
    """EmptyImage → WorkerTestSleepProgress (node 2) → SaveImage (node 3)."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}},
            "2": {"class_type": "WorkerTestSleepProgress",
                  "inputs": {"image": ["1", 0], "steps": steps, "step_s": step_s, "seed": seed, **test_node}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "probe"}}}


@pytest.fixture()
def double() -> Iterator[ComfyDouble]:
    server = ComfyDouble().start()
    yield server
    server.stop()


def connector_env(double: ComfyDouble, redis_url: str, **extra: str) -> dict[str, str]:
    return {"WORKER_COMFYUI_HOST": "127.0.0.1", "WORKER_COMFYUI_PORT": str(double.port), "REDIS_URL": redis_url,
            "HUB_REDIS_URL": redis_url, "WORKER_ID": "w-comfy", **extra}


@pytest.fixture()
def comfy(double: ComfyDouble, redis_server: str, client: redis.Redis) -> ComfyUIConnector:
    return ComfyUIConnector(connector_env(double, redis_server))


class Job:
    """A job attempt as the connector sees it, recording progress reports."""

    def __init__(self, payload: dict[str, Any], job_id: str = "job-1"):
        self.reports: list[tuple[int, str, Any, Any]] = []
        self.context = JobContext({"id": job_id, "attempt": "1", "service_required": "comfyui"}, payload, {},
                                  lambda p, m, s, t: self.reports.append((p, m, s, t)))


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(check: Callable[[], Any], timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
    return value


# -- the double follows the reference's routing rules -------------------------------------------------------
def post(double: ComfyDouble, path: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(double.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            raw = reply.read()
            return reply.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def drain(ws: websocket.WebSocket, until: str, timeout_s: float = 5) -> list[str]:
    kinds: list[str] = []
    ws.settimeout(timeout_s)
    while until not in kinds:
        opcode, data = ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_TEXT:
            kinds.append(json.loads(data)["type"])
    return kinds


def test_double_routes_prompt_events_only_to_its_client(double: ComfyDouble) -> None:
    mine = websocket.create_connection(f"ws://127.0.0.1:{double.port}/ws?clientId=mine", timeout=5)
    other = websocket.create_connection(f"ws://127.0.0.1:{double.port}/ws?clientId=other", timeout=5)
    anonymous = websocket.create_connection(f"ws://127.0.0.1:{double.port}/ws", timeout=5)
    status, reply = post(double, "/prompt", {"prompt": workflow(steps=2), "client_id": "mine"})
    assert status == 200 and reply["node_errors"] == {}
    kinds = drain(mine, "execution_success")
    assert kinds[:2] == ["status", "status"] and "execution_start" in kinds and kinds.count("progress") == 2
    assert kinds.index("executing") < kinds.index("progress") < kinds.index("executed")
    wait_for(lambda: double.history)
    other.settimeout(0.3)
    seen = []
    try:
        while True:
            seen.append(json.loads(other.recv())["type"])
    except websocket.WebSocketTimeoutException:
        pass
    assert set(seen) == {"status"}
    # the E0 pattern: socket without clientId, client_id only in extra_data: nothing but status arrives
    status, _ = post(double, "/prompt", {"prompt": workflow(steps=1, seed=2), "extra_data": {"client_id": "comfyui"}})
    assert status == 200
    wait_for(lambda: len(double.history) == 2)
    anonymous.settimeout(0.3)
    seen = []
    try:
        while True:
            seen.append(json.loads(anonymous.recv())["type"])
    except websocket.WebSocketTimeoutException:
        pass
    assert set(seen) == {"status"}
    for ws in (mine, other, anonymous):
        ws.close()


def test_double_validates_before_queueing(double: ComfyDouble) -> None:
    status, reply = post(double, "/prompt", {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}})
    assert status == 400 and reply["error"]["type"] == "invalid_prompt" and reply["node_errors"] == {}
    status, reply = post(double, "/prompt", {"prompt": {"1": {"class_type": "EmptyImage", "inputs": {}}}})
    assert status == 400 and reply["error"]["type"] == "prompt_no_outputs"
    status, reply = post(double, "/prompt", {"nothing": 1})
    assert status == 400 and reply["error"]["type"] == "no_prompt"
    assert double.pending == [] and double.history == {}


# -- the connector ------------------------------------------------------------------------------------------
def test_normal_run_follows_its_prompt_and_returns_downloadable_files(
        comfy: ComfyUIConnector, double: ComfyDouble, queue: Queue, settings: QueueSettings) -> None:
    job = Job({"workflow": workflow(steps=4)})
    result = comfy.run(job.context)
    method, path, body = next(r for r in double.requests if r[1] == "/prompt")
    assert body["client_id"] == comfy.client_id and body["prompt_id"] == result["prompt_id"]
    assert result["status"] == "success" and result["cached_nodes"] == []
    [file] = result["files"]
    assert file["node"] == "3" and file["content_type"] == "image/png"
    assert file["url"] == f"/api/jobs/job-1/outputs/{file['name']}"
    messages = [m for _, m, _, _ in job.reports]
    assert "Running node 2 (WorkerTestSleepProgress)" in messages
    assert [s for _, m, s, t in job.reports if m.startswith("Node 2")] == [1, 2, 3, 4]
    percents = [p for p, _, _, _ in job.reports]
    assert percents == sorted(percents) and percents[-1] == 100
    app = falcon.testing.TestClient(create_app(ApiSettings(queue=settings), queue))
    download = app.simulate_get(file["url"])
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert download.content == double.files[("output", "", file["filename"])]
    missing = app.simulate_get("/api/jobs/job-1/outputs/nope.png")
    assert missing.status_code == 404 and missing.json["success"] is False


def test_cached_rerun_completes_with_the_old_output(comfy: ComfyUIConnector) -> None:
    first = comfy.run(Job({"workflow": workflow(steps=2)}).context)
    job = Job({"workflow": workflow(steps=2)}, job_id="job-2")
    second = comfy.run(job.context)
    assert second["cached_nodes"] == ["1", "2", "3"]
    assert second["files"][0]["filename"] == first["files"][0]["filename"]
    assert job.reports[-1][0] == 100


def test_runtime_error_fails_with_node_exception_type_and_message(comfy: ComfyUIConnector) -> None:
    with pytest.raises(ConnectorError) as err:
        comfy.run(Job({"workflow": workflow(steps=4, fail_at_step=2)}).context)
    assert str(err.value) == ("ComfyUI node 2 (WorkerTestSleepProgress) raised RuntimeError: "
                              "WorkerTestSleepProgress: deliberate failure at step 2 of 4")
    assert err.value.retryable is False and err.value.details["node_id"] == "2"


def test_validation_error_is_final_and_carries_node_errors(comfy: ComfyUIConnector, double: ComfyDouble) -> None:
    bad = workflow()
    del bad["2"]["inputs"]["steps"]
    with pytest.raises(ConnectorError) as err:
        comfy.run(Job({"workflow": bad}).context)
    assert err.value.retryable is False
    assert err.value.details["node_errors"]["2"]["errors"][0]["type"] == "required_input_missing"
    assert "Required input is missing (steps)" in str(err.value)
    with pytest.raises(ConnectorError, match="NoSuchNode does not exist") as err:
        comfy.run(Job({"workflow": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}).context)
    assert err.value.retryable is False
    with pytest.raises(ConnectorError, match="payload.workflow"):
        comfy.run(Job({}).context)


def test_cancel_interrupts_its_running_prompt(comfy: ComfyUIConnector, double: ComfyDouble) -> None:
    job = Job({"workflow": workflow(steps=200, step_s=0.02)})
    thread, outcome = in_thread(lambda: comfy.run(job.context))
    wait_for(lambda: any(m.startswith("Node 2") for _, m, _, _ in job.reports))
    prompt_id = comfy.prompts["job-1"]
    job.context.stop("cancel")
    comfy.cancel(job.context)
    thread.join(10)
    assert isinstance(outcome.get("error"), JobStopped)
    assert ("POST", "/interrupt", {"prompt_id": prompt_id}) in double.requests
    entry = wait_for(lambda: double.history.get(prompt_id))
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"


def test_cancel_before_it_runs_deletes_it_from_comfyuis_queue(comfy: ComfyUIConnector, double: ComfyDouble) -> None:
    status, busy = post(double, "/prompt", {"prompt": workflow(steps=100, step_s=0.02, seed=9), "client_id": "x"})
    job = Job({"workflow": workflow(steps=2)})
    thread, outcome = in_thread(lambda: comfy.run(job.context))
    wait_for(lambda: "job-1" in comfy.prompts and any(i["prompt_id"] == comfy.prompts["job-1"]
                                                      for i in double.pending))
    prompt_id = comfy.prompts["job-1"]
    job.context.stop("timeout")
    comfy.cancel(job.context)
    thread.join(10)
    assert isinstance(outcome.get("error"), JobStopped)
    assert ("POST", "/queue", {"delete": [prompt_id]}) in double.requests
    assert all(i["prompt_id"] != prompt_id for i in double.pending)
    post(double, "/interrupt", {})
    wait_for(lambda: busy["prompt_id"] in double.history)
    assert prompt_id not in double.history


def test_prompt_deleted_from_comfyuis_queue_by_someone_else_fails(
        comfy: ComfyUIConnector, double: ComfyDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("connectors.comfyui_follow.QUIET_POLL_S", 0.1)
    status, busy = post(double, "/prompt", {"prompt": workflow(steps=200, step_s=0.02, seed=7), "client_id": "x"})
    job = Job({"workflow": workflow(steps=2)})
    thread, outcome = in_thread(lambda: comfy.run(job.context))
    wait_for(lambda: "job-1" in comfy.prompts and any(i["prompt_id"] == comfy.prompts["job-1"]
                                                      for i in double.pending))
    post(double, "/queue", {"delete": [comfy.prompts["job-1"]]})  # no event tells anyone
    thread.join(10)
    assert isinstance(outcome.get("error"), ConnectorError)
    assert "vanished from ComfyUI" in str(outcome["error"]) and outcome["error"].retryable
    post(double, "/interrupt", {})


def test_dropped_socket_mid_job_reconnects_and_finishes(comfy: ComfyUIConnector) -> None:
    job = Job({"workflow": workflow(steps=6, step_s=0.05, drop_socket_at_step=2)})
    result = comfy.run(job.context)
    assert result["status"] == "success" and len(result["files"]) == 1


def test_terminal_event_missed_while_disconnected_is_made_up_from_history(comfy: ComfyUIConnector,
                                                                          double: ComfyDouble) -> None:
    """After the drop the connector cannot get back in until the prompt is over: it learns the end from
    /history."""

    def reopen_later() -> None:
        wait_for(lambda: double.history, 10)
        time.sleep(0.3)
        double.refuse_ws = False

    job = Job({"workflow": workflow(steps=4, step_s=0.05, drop_socket_at_step=1)})
    threading.Thread(target=reopen_later, daemon=True).start()
    original = double.drop_sockets

    def drop_and_refuse(client_id: str) -> None:
        double.refuse_ws = True
        original(client_id)

    double.drop_sockets = drop_and_refuse  # type: ignore[method-assign]
    result = comfy.run(job.context)
    assert result["status"] == "success" and len(result["files"]) == 1
    assert [r for r in double.requests if r[1].startswith("/history/")]  # how it learnt the end


def test_binary_previews_are_ignored(comfy: ComfyUIConnector) -> None:
    result = comfy.run(Job({"workflow": workflow(steps=3, send_preview=True)}).context)
    assert result["status"] == "success"


def test_workflow_timeout_interrupts_and_fails(double: ComfyDouble, redis_server: str, client: redis.Redis) -> None:
    comfy = ComfyUIConnector(connector_env(double, redis_server, WORKER_COMFYUI_WORKFLOW_TIMEOUT_SECONDS="0.3"))
    with pytest.raises(ConnectorError, match="did not finish within 0.3s") as err:
        comfy.run(Job({"workflow": workflow(steps=100, step_s=0.02)}).context)
    assert err.value.retryable is True
    assert any(r[1] == "/interrupt" for r in double.requests)


def test_health_decides_whether_the_worker_offers_comfyui(comfy: ComfyUIConnector, double: ComfyDouble,
                                                         client: redis.Redis, settings: QueueSettings) -> None:
    worker = Worker(WorkerSettings(queue=settings, worker_id="w-comfy", services=("comfyui",),
                                   connectors=("comfyui",)), client, client, {"comfyui": comfy})
    assert comfy.check_health() is True
    assert comfy.models() == ["sd_xl_base_1.0.safetensors", "v1-5-pruned.safetensors"]
    assert worker.claim_queues() == [worker.keys.pending_service("comfyui")]
    double.healthy = False
    assert comfy.check_health() is False
    assert worker.claim_queues() == []


def test_basic_auth(redis_server: str, client: redis.Redis) -> None:
    server = ComfyDouble(auth=("user", "s3cret")).start()
    try:
        assert ComfyUIConnector(connector_env(server, redis_server)).check_health() is False
        comfy = ComfyUIConnector(connector_env(server, redis_server, WORKER_COMFYUI_USERNAME="user",
                                               WORKER_COMFYUI_PASSWORD="s3cret"))
        assert comfy.check_health() is True
        assert comfy.run(Job({"workflow": workflow(steps=1)}).context)["status"] == "success"
    finally:
        server.stop()


# -- a real worker process ----------------------------------------------------------------------------------
def test_worker_process_runs_a_comfyui_job(double: ComfyDouble, env_base: dict[str, str], client: redis.Redis,
                                           queue: Queue, settings: QueueSettings) -> None:
    env = {**env_base, **connector_env(double, env_base["REDIS_URL"]),
           "WORKER_CONNECTORS": "comfyui", "WORKER_HEARTBEAT_INTERVAL_MS": "200"}
    k = queue.keys
    with worker_process(env, client, "comfy-proc", timeout_s=30) as proc:
        job_id = queue.submit(JobSpec.parse({"service_required": "comfyui",
                                             "payload": {"workflow": workflow(steps=3)}}))
        bad_id = queue.submit(JobSpec.parse({"service_required": "comfyui",
                                             "payload": {"workflow": {"1": {"class_type": "Nope", "inputs": {}}}}}))
        wait_alive(proc, lambda: client.hget(k.job(job_id), "status") == "completed"
                   and client.hget(k.job(bad_id), "status") == "failed", 30, "both jobs to end")
        job = queue.get(job_id)
        assert job["worker_id"] == "comfy-proc"
        [file] = job["result"]["files"]
        app = falcon.testing.TestClient(create_app(ApiSettings(queue=settings), queue))
        assert app.simulate_get(file["url"]).content == double.files[("output", "", file["filename"])]
        steps = [f.get("current_step") for _, f in client.xrange(k.progress(job_id)) if f["event"] == "progress"]
        assert "node 2" in steps
        assert "Nope does not exist" in queue.get(bad_id)["error"]
        assert queue.get(bad_id)["retry_count"] == 0
