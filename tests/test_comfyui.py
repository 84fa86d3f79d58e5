"""The ComfyUI connector against the protocol-faithful double (tests/comfyui_double.py): normal run, cached
rerun, runtime error, 400, interrupt, delete while pending, dropped socket, previews, health and models, basic
auth, timeout, input images, progress weighted by steps, payloads refused at submit; the double's routing
rules; and real worker processes: a ComfyUI job end to end with failure details, ComfyUI dying under a job or
refusing it at claim time (handed back, no retry counted), an earlier attempt's orphaned prompt, previews."""

from __future__ import annotations

import base64
import json
import signal
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
from appliance.connector import ConnectorError, JobContext, JobStopped, ServiceUnavailable
from appliance.jobs import JobSpec
from appliance.keys import Keys
from appliance.outputs import OutputStore
from appliance.queue import Queue
from appliance.settings import ApiSettings, QueueSettings, WorkerSettings
from appliance.worker import Worker
from comfyui_double import PNG, ComfyDouble, preview_image
from connectors.comfyui import ComfyUIConnector
from connectors.comfyui_settings import ComfyUISettings
from procs import wait_alive, worker_process, workers


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


def connector(double: ComfyDouble, redis_url: str, **extra: str) -> ComfyUIConnector:
    """The connector as a worker's entry point makes it: from its parsed settings."""
    return ComfyUIConnector(ComfyUISettings.from_env(connector_env(double, redis_url, **extra)))


@pytest.fixture()
def comfy(double: ComfyDouble, redis_server: str, client: redis.Redis) -> ComfyUIConnector:
    return connector(double, redis_server)


@pytest.fixture(autouse=True)
def outputs(client: redis.Redis, settings: QueueSettings) -> Iterator[OutputStore]:
    """Where each test's job contexts store files, as a worker's do (the API serves them from there)."""
    Job.outputs = OutputStore(client, Keys(settings.key_prefix), settings.completed_ttl_s)
    yield Job.outputs
    Job.outputs = None


class Job:
    """A job attempt as the connector sees it, recording progress reports."""

    outputs: OutputStore | None = None

    def __init__(self, payload: dict[str, Any], job_id: str = "job-1"):
        self.reports: list[tuple[int, str, Any, Any]] = []
        self.context = JobContext({"id": job_id, "attempt": "1", "service_required": "comfyui"}, payload, {},
                                  lambda p, m, s, t: self.reports.append((p, m, s, t)), outputs=self.outputs)


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
    assert "WorkerTestSleepProgress (node 2)" in messages
    assert [s for _, m, s, t in job.reports if m.startswith("WorkerTestSleepProgress (node 2): step")] == [1, 2, 3, 4]
    assert "WorkerTestSleepProgress (node 2): step 4/4" in messages
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
    wait_for(lambda: any(": step" in m for _, m, _, _ in job.reports))
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


def test_comfyui_restarted_under_a_job_hands_it_back(comfy: ComfyUIConnector, double: ComfyDouble,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI's process is killed and restarted at once (supervisord): the socket drops, the reconnection
    reaches a new ComfyUI that never heard of the prompt. That is the service's outage (ServiceUnavailable,
    handed back with no retry counted), not the job's failure."""
    monkeypatch.setattr("connectors.comfyui_follow.QUIET_POLL_S", 0.1)
    job = Job({"workflow": workflow(steps=400, step_s=0.05)})
    thread, outcome = in_thread(lambda: comfy.run(job.context))
    wait_for(lambda: double.running is not None)
    double.stop()
    again = ComfyDouble(port=double.port).start()
    try:
        thread.join(20)
        assert isinstance(outcome.get("error"), ServiceUnavailable), outcome
        assert "restarted" in str(outcome["error"])
    finally:
        again.stop()


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
    comfy = connector(double, redis_server, WORKER_COMFYUI_WORKFLOW_TIMEOUT_SECONDS="0.3")
    with pytest.raises(ConnectorError, match="did not finish within 0.3s") as err:
        comfy.run(Job({"workflow": workflow(steps=100, step_s=0.02)}).context)
    assert err.value.retryable is True
    assert any(r[1] == "/interrupt" for r in double.requests)


def test_health_decides_whether_the_worker_offers_comfyui(comfy: ComfyUIConnector, double: ComfyDouble,
                                                         client: redis.Redis, settings: QueueSettings) -> None:
    worker = Worker(WorkerSettings(queue=settings, worker_id="w-comfy", services=("comfyui",),
                                   connectors=("comfyui",)), client, client, {"comfyui": comfy})
    assert comfy.check_health() is True
    # every model folder ComfyUI lists (GET /models, /models/{folder}), but not its configs or custom nodes
    assert comfy.models() == ["detail_tweaker.safetensors", "sd_xl_base_1.0.safetensors", "v1-5-pruned.safetensors"]
    assert [r[1] for r in double.requests if r[1].startswith("/models")] == [
        "/models", "/models/checkpoints", "/models/loras", "/models/vae"]
    info = comfy.health_info()
    assert info["ok"] is True and info["version"] == "0.3.64" and info["url"] == double.url
    assert info["queue_remaining"] == 0 and info["error"] == ""
    assert worker.claim_queues() == [worker.keys.pending_service("comfyui")]
    double.healthy = False
    assert comfy.check_health() is False
    assert worker.claim_queues() == []
    assert comfy.health_info()["ok"] is False and "500" in comfy.health_info()["error"]


def test_progress_weighs_nodes_by_their_steps(comfy: ComfyUIConnector) -> None:
    """EmptyImage (1) → an 8-step node (8) → SaveImage (1): the 8 steps move the bar from 10 to 90 %, and each
    message names the node's class and step."""
    job = Job({"workflow": workflow(steps=8)})
    comfy.run(job.context)
    steps = [(p, m) for p, m, _, _ in job.reports if ": step" in m]
    assert [p for p, _ in steps] == [20, 30, 40, 50, 60, 70, 80, 90]
    assert steps[3][1] == "WorkerTestSleepProgress (node 2): step 4/8"


def test_input_images_are_uploaded_and_referenced(comfy: ComfyUIConnector, double: ComfyDouble) -> None:
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "loaded"}}}
    payload = {"workflow": graph, "images": {"in.png": base64.b64encode(PNG).decode()}}
    result = comfy.run(Job(payload).context)
    assert result["status"] == "success"
    [upload] = [body for _, path, body in double.requests if path == "/upload/image"]
    assert upload["filename"] == "in.png" and upload["subfolder"] == "appliance-job-1" and upload["size"] == len(PNG)
    assert double.files[("input", "appliance-job-1", "in.png")] == PNG
    [posted] = [body for _, path, body in double.requests if path == "/prompt"]
    assert posted["prompt"]["1"]["inputs"]["image"] == "appliance-job-1/in.png"
    # without the upload, ComfyUI refuses the LoadImage node: the reference is what made it run
    with pytest.raises(ConnectorError, match="Invalid image file: in.png"):
        comfy.run(Job({"workflow": graph}, job_id="job-2").context)


@pytest.mark.parametrize(("payload", "field", "words"), [
    ({"workflow": {"last_node_id": 9, "last_link_id": 9, "nodes": [{"id": 3, "type": "KSampler"}], "links": []}},
     "payload.workflow", "UI-format workflow (File → Save); export it with 'Save (API Format)'"),
    ({"workflow": {}}, "payload.workflow", "empty object"),
    ({"workflow": "hello"}, "payload.workflow", "got str"),
    ({}, "payload.workflow", "required"),
    ({"workflow": {"1": {"inputs": {}}}}, "payload.workflow.1.class_type", "required"),
    ({"workflow": {"1": {"class_type": "EmptyImage"}}}, "payload.workflow.1.inputs", "required"),
    ({"prompt": [1]}, "payload.prompt", "got list"),
    ({"workflow": workflow(), "images": {"../x.png": "AAAA"}}, "payload.images", "no folders"),
    ({"workflow": workflow(), "images": {"x.png": "not base64!"}}, "payload.images.x.png", "base64"),
])
def test_submit_refuses_what_comfyui_could_not_run(queue: Queue, settings: QueueSettings, payload: dict[str, Any],
                                                   field: str, words: str) -> None:
    app = falcon.testing.TestClient(create_app(ApiSettings(queue=settings), queue))
    reply = app.simulate_post("/api/jobs", json={"service_required": "comfyui", "payload": payload})
    assert reply.status_code == 400, reply.json
    assert reply.json["field"] == field and words in reply.json["error"]
    good = {"workflow": workflow(), "images": {"x.png": base64.b64encode(PNG).decode()}}
    assert app.simulate_post("/api/jobs", json={"service_required": "comfyui", "payload": good}).status_code == 201
    assert app.simulate_post("/api/jobs", json={"service_required": "comfyui",
                                                "payload": {"prompt": workflow()}}).status_code == 201


def test_a_graph_comfyui_cannot_read_is_not_retried(comfy: ComfyUIConnector, double: ComfyDouble) -> None:
    """A graph that passes the submit check but makes ComfyUI fail (its 500) ends the job: retrying cannot help."""
    with pytest.raises(ConnectorError, match="could not read the workflow: POST /prompt answered 500") as err:
        comfy.run(Job({"workflow": {"1": {"class_type": "LoadImage", "inputs": {"image": 7}},
                                    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}}).context)
    assert err.value.retryable is False and err.value.details["status"] == 500


def test_basic_auth(redis_server: str, client: redis.Redis) -> None:
    server = ComfyDouble(auth=("user", "s3cret")).start()
    try:
        assert connector(server, redis_server).check_health() is False
        comfy = connector(server, redis_server, WORKER_COMFYUI_USERNAME="user",
                          WORKER_COMFYUI_PASSWORD="s3cret")
        assert comfy.check_health() is True
        assert comfy.run(Job({"workflow": workflow(steps=1)}).context)["status"] == "success"
    finally:
        server.stop()


# -- real worker processes ---------------------------------------------------------------------------------
def proc_env(double: ComfyDouble, env_base: dict[str, str], **extra: str) -> dict[str, str]:
    return {**env_base, **connector_env(double, env_base["REDIS_URL"]), "WORKER_CONNECTORS": "comfyui",
            "WORKER_HEARTBEAT_INTERVAL_MS": "200", **extra}


def submit(queue: Queue, payload: dict[str, Any], **fields: Any) -> str:
    return queue.submit(JobSpec.parse({"service_required": "comfyui", "payload": payload, **fields}))


def events(client: redis.Redis, job_id: str) -> list[dict[str, str]]:
    return [fields for _, fields in client.xrange(Keys().progress(job_id))]


def test_worker_process_runs_a_comfyui_job(double: ComfyDouble, env_base: dict[str, str], client: redis.Redis,
                                           queue: Queue, settings: QueueSettings) -> None:
    k = queue.keys
    app = falcon.testing.TestClient(create_app(ApiSettings(queue=settings), queue))
    with worker_process(proc_env(double, env_base), client, "comfy-proc", timeout_s=30) as proc:
        job_id = submit(queue, {"workflow": workflow(steps=3)}, requirements={"models": "detail_tweaker.safetensors"})
        bad_id = submit(queue, {"workflow": {"1": {"class_type": "Nope", "inputs": {}}}})
        refused = workflow(seed=5)
        del refused["2"]["inputs"]["steps"]
        refused_id = submit(queue, {"workflow": refused})
        raising_id = submit(queue, {"workflow": workflow(steps=3, seed=6, fail_at_step=2)})
        ids = (job_id, bad_id, refused_id, raising_id)
        wait_alive(proc, lambda: all(client.hget(k.job(i), "status") in ("completed", "failed") for i in ids), 30,
                   "the jobs to end")
        job = app.simulate_get(f"/api/jobs/{job_id}").json["job"]
        assert job["status"] == "completed" and job["worker_id"] == "comfy-proc"
        assert job["comfyui_prompt_id"] == job["result"]["prompt_id"] and job["comfyui_url"] == double.url
        [file] = job["result"]["files"]
        assert app.simulate_get(file["url"]).content == double.files[("output", "", file["filename"])]
        steps = [f.get("current_step") for f in events(client, job_id) if f["event"] == "progress"]
        assert "node 2" in steps
        bad = app.simulate_get(f"/api/jobs/{bad_id}").json["job"]
        assert "Nope does not exist" in bad["error"] and bad["retry_count"] == 0
        assert bad["error_details"]["error"]["type"] == "invalid_prompt"
        # a refused workflow keeps ComfyUI's node_errors; a runtime failure its node, exception and traceback:
        # in the record (GET) and in the terminal event
        refused_job = app.simulate_get(f"/api/jobs/{refused_id}").json["job"]
        node_error = refused_job["error_details"]["node_errors"]["2"]
        assert node_error["class_type"] == "WorkerTestSleepProgress"
        assert node_error["errors"][0]["type"] == "required_input_missing"
        raising = app.simulate_get(f"/api/jobs/{raising_id}").json["job"]
        assert raising["status"] == "failed"
        assert raising["message"] == raising["error"]  # not the last progress line ("…: step 1/4")
        details = raising["error_details"]
        assert details["node_id"] == "2" and details["node_type"] == "WorkerTestSleepProgress"
        assert details["exception_type"] == "RuntimeError" and "deliberate failure" in details["exception_message"]
        assert details["traceback"] and details["prompt_id"] == raising["comfyui_prompt_id"]
        for failed_id, expected in ((refused_id, refused_job["error_details"]), (raising_id, details)):
            [terminal] = [f for f in events(client, failed_id) if f["event"] == "failed"]
            assert json.loads(terminal["error_details"]) == expected
        # the worker's record shows its ComfyUI and the models it has
        [worker] = app.simulate_get("/api/workers").json["workers"]
        health = worker["services_health"]["comfyui"]
        assert health["ok"] is True and health["version"] == "0.3.64" and health["url"] == double.url
        assert "detail_tweaker.safetensors" in worker["capabilities"]["models"]["comfyui"]


def test_comfyui_dying_under_a_job_hands_it_back(double: ComfyDouble, env_base: dict[str, str],
                                                 client: redis.Redis, queue: Queue) -> None:
    """ComfyUI's process ends while a job runs: the job is back in line within seconds with no retry counted
    and no failure, and the worker stops offering comfyui at once (its health check would wait 600 s)."""
    k = queue.keys
    env = proc_env(double, env_base, WORKER_COMFYUI_HEALTH_INTERVAL_SECONDS="600")
    with worker_process(env, client, "comfy-dies", timeout_s=30) as proc:
        job_id = submit(queue, {"workflow": workflow(steps=400, step_s=0.05)})
        wait_alive(proc, lambda: ": step" in (client.hget(k.job(job_id), "message") or ""), 20, "the job to run")
        double.stop()
        wait_alive(proc, lambda: any(f["event"] == "requeued" for f in events(client, job_id)), 20,
                   "the job to be handed back")
        job = queue.get(job_id)
        assert job is not None and job["status"] == "pending" and job.get("retry_count", 0) == 0
        assert not [f for f in events(client, job_id) if f["event"] in ("retrying", "failed")]
        [requeued] = [f for f in events(client, job_id) if f["event"] == "requeued"]
        assert "unreachable" in requeued["message"]
        wait_alive(proc, lambda: "comfyui" not in client.hget(k.worker("comfy-dies"), "services").split(","), 10,
                   "the worker to stop offering comfyui")
        health = json.loads(client.hget(k.worker("comfy-dies"), "services_health"))["comfyui"]
        assert health["ok"] is False and "does not answer" in health["error"]


def test_comfyui_restarted_under_a_job_hands_it_back_without_a_retry(
        double: ComfyDouble, env_base: dict[str, str], client: redis.Redis, queue: Queue) -> None:
    """ComfyUI killed and restarted at once on the same port (supervisord): requeued, retry_count 0."""
    k = queue.keys
    with worker_process(proc_env(double, env_base), client, "comfy-restarts", timeout_s=30) as proc:
        job_id = submit(queue, {"workflow": workflow(steps=400, step_s=0.05)}, max_retries=0)
        wait_alive(proc, lambda: ": step" in (client.hget(k.job(job_id), "message") or ""), 20, "the job to run")
        double.stop()
        again = ComfyDouble(port=double.port).start()
        try:
            wait_alive(proc, lambda: any(f["event"] == "requeued" for f in events(client, job_id)), 20,
                       "the job to be handed back")
            job = queue.get(job_id)
            assert job is not None and job.get("retry_count", 0) == 0
            assert not [f for f in events(client, job_id) if f["event"] in ("retrying", "failed")]
        finally:
            again.stop()


def test_comfyui_refusing_at_claim_time_hands_the_job_back(double: ComfyDouble, env_base: dict[str, str],
                                                           client: redis.Redis, queue: Queue) -> None:
    """Healthy at the last check, gone at the claim: the job goes back in line at once, no retry counted."""
    k = queue.keys
    env = proc_env(double, env_base, WORKER_COMFYUI_HEALTH_INTERVAL_SECONDS="600")
    with worker_process(env, client, "comfy-gone", timeout_s=30) as proc:
        double.stop()
        job_id = submit(queue, {"workflow": workflow(steps=2)})
        wait_alive(proc, lambda: any(f["event"] == "requeued" for f in events(client, job_id)), 20,
                   "the job to be handed back")
        job = queue.get(job_id)
        assert job is not None and job["status"] == "pending" and job.get("retry_count", 0) == 0
        assert not [f for f in events(client, job_id) if f["event"] in ("retrying", "failed")]
        wait_alive(proc, lambda: not json.loads(client.hget(k.worker("comfy-gone"), "services_health") or "{}")
                   .get("comfyui", {}).get("ok", True), 10, "the worker to report ComfyUI down")


def test_a_worker_whose_comfyui_is_down_never_advertises_it(double: ComfyDouble, env_base: dict[str, str],
                                                           client: redis.Redis, queue: Queue) -> None:
    """Its first health check runs before it registers: the record's services list only the healthy ones."""
    double.stop()
    k = queue.keys
    with worker_process(proc_env(double, env_base), client, "comfy-down", timeout_s=30) as proc:
        wait_alive(proc, lambda: client.hget(k.worker("comfy-down"), "services") is not None, 20,
                   "the worker to register")
        assert "comfyui" not in client.hget(k.worker("comfy-down"), "services").split(",")


def test_next_attempt_stops_the_prompt_a_killed_worker_left(double: ComfyDouble, env_base: dict[str, str],
                                                            client: redis.Redis, queue: Queue) -> None:
    """A worker SIGKILLed mid-prompt leaves it running in ComfyUI; the job's next attempt interrupts it (named
    by the job's comfyui_prompt_id) before posting its own."""
    k = queue.keys
    env = proc_env(double, env_base, JOB_RETRY_BASE_MS="0")
    job_id = submit(queue, {"workflow": workflow(steps=600, step_s=0.05)})
    with workers(env, "comfy-kill") as procs:
        wait_for(lambda: ": step" in (client.hget(k.job(job_id), "message") or ""), 30)
        earlier = client.hget(k.job(job_id), "comfyui_prompt_id")
        assert earlier and double.running and double.running["prompt_id"] == earlier
        procs["comfy-kill"].signal(signal.SIGKILL)
        procs["comfy-kill"].proc.wait(10)
    # restarted under the same id (as supervisord does), it recovers the job and runs it again
    with worker_process(env, client, "comfy-kill", timeout_s=30) as proc:
        wait_alive(proc, lambda: ("POST", "/interrupt", {"prompt_id": earlier}) in double.requests, 30,
                   "the earlier prompt to be interrupted")
        wait_alive(proc, lambda: (double.history.get(earlier) or {}).get("status"), 10, "the earlier prompt to end")
        assert double.history[earlier]["status"]["messages"][-1][0] == "execution_interrupted"
        wait_alive(proc, lambda: client.hget(k.job(job_id), "comfyui_prompt_id") != earlier, 10,
                   "the next attempt's prompt")
        later = client.hget(k.job(job_id), "comfyui_prompt_id")
        assert any(i["prompt_id"] == later for i in ([double.running] if double.running else []) + double.pending) \
            or later in double.history
        assert queue.cancel(job_id) in ("cancelled", "cancelling")


def test_previews_are_served_while_a_job_runs(double: ComfyDouble, env_base: dict[str, str], client: redis.Redis,
                                              queue: Queue, settings: QueueSettings) -> None:
    k = queue.keys
    app = falcon.testing.TestClient(create_app(ApiSettings(queue=settings), queue))
    with worker_process(proc_env(double, env_base), client, "comfy-preview", timeout_s=30) as proc:
        job_id = submit(queue, {"workflow": workflow(steps=30, step_s=0.1, send_preview=True)})
        assert app.simulate_get(f"/api/jobs/{job_id}/preview").status_code == 404
        wait_alive(proc, lambda: any(f["event"] == "preview" for f in events(client, job_id)), 20, "a preview")
        live = app.simulate_get(f"/api/jobs/{job_id}/preview")
        assert live.status_code == 200 and live.headers["content-type"] == "image/jpeg"
        assert live.content.startswith(b"\xff\xd8jpeg-step-")
        wait_alive(proc, lambda: client.hget(k.job(job_id), "status") == "completed", 30, "the job to end")
        # the latest frame is kept; `preview` events are limited to about one a second (30 frames in 3 s)
        assert app.simulate_get(f"/api/jobs/{job_id}/preview").content == preview_image(30)
        previews = [f for f in events(client, job_id) if f["event"] == "preview"]
        assert 1 <= len(previews) < 30
        assert previews[0]["comfyui_preview"] == f"/api/jobs/{job_id}/preview"
