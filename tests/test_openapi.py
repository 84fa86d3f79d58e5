"""The OpenAPI document (/openapi.json) and the /docs page: a valid document, every route in it, and every bound
it declares the one the API enforces (a value just outside is a 400 naming the field, just inside accepted)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import falcon.inspect
import falcon.testing
import jsonschema
import orjson
import pytest
import redis
from openapi_spec_validator import validate

from appliance.api.app import create_app
from appliance.api.live import create_live
from appliance.api.openapi import document
from appliance.queue import Queue
from appliance.settings import ApiSettings, QueueSettings
from live_api import FakeWorker, recv, recv_until, running_api, send, ws_connect

METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture()
def api(client: redis.Redis, settings: QueueSettings) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(ApiSettings(queue=settings), Queue(client, settings)))


def served(api: falcon.testing.TestClient) -> dict[str, Any]:
    result = api.simulate_get("/openapi.json")
    assert result.status_code == 200 and result.headers["content-type"].startswith("application/json")
    doc: dict[str, Any] = result.json
    return doc


def validator(doc: dict[str, Any], name: str) -> jsonschema.protocols.Validator:
    """A JSON Schema validator of components.schemas[name], its references resolved within the document."""
    root = {**doc, "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


# -- the document --------------------------------------------------------------------------------------------
def test_document_is_valid_openapi(api: falcon.testing.TestClient) -> None:
    doc = served(api)
    validate(doc)
    assert doc["openapi"].startswith("3.")
    validate(document(keys=True))


def test_every_route_is_documented(settings: QueueSettings, client: redis.Redis) -> None:
    """The document's operations are exactly the routes and methods the app serves (Falcon's own inspection)."""
    api_settings = ApiSettings(queue=settings)
    queue = Queue(client, settings)
    app = create_app(api_settings, queue, create_live(api_settings, queue))
    served_ops = {(route.path, m.method.lower()) for route in falcon.inspect.inspect_routes(app)
                  for m in route.methods if not m.internal}
    paths = document()["paths"]
    documented = {(path, method) for path, item in paths.items() for method in item if method in METHODS}
    assert served_ops == documented
    for path in ("/health", "/api/health", "/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/progress",
                 "/api/workers", "/api/connection-stats", "/api/jobs/{job_id}/outputs/{name}", "/openapi.json",
                 "/docs"):
        assert path in paths


def test_errors_and_security_are_declared() -> None:
    for keys in (False, True):
        doc = document(keys=keys)
        assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKeyHeader", "apiKeyQuery"}
        schemes = doc["components"]["securitySchemes"]
        assert schemes["apiKeyHeader"]["name"] == "X-API-Key" and schemes["apiKeyQuery"]["name"] == "token"
        assert schemes["bearer"]["scheme"] == "bearer"
        for path, item in doc["paths"].items():
            for method, op in item.items():
                if method not in METHODS:
                    continue
                errors = {code for code in op["responses"] if code[0] in "45"}
                assert "500" in errors, (path, method)
                for code in errors:
                    assert op["responses"][code]["content"]["application/json"]["schema"] == \
                        {"$ref": "#/components/schemas/Error"}, (path, method, code)
                is_open = path in ("/health", "/api/health", "/openapi.json", "/docs")
                if keys and not is_open:
                    assert op["security"] and "401" in errors, (path, method)
                    assert ("403" in errors) is (path == "/api/workers"), (path, method)
                else:
                    assert op["security"] == [] and "401" not in errors, (path, method)
                if path not in ("/openapi.json", "/docs"):
                    assert "503" in errors, (path, method)


def test_records_come_from_the_wire_tables() -> None:
    from appliance.jobs import JOB_FIELDS, WORKER_FIELDS

    schemas = document()["components"]["schemas"]
    for table, name in ((JOB_FIELDS, "Job"), (WORKER_FIELDS, "Worker")):
        shown = {field for field, kind in table.items() if kind != "hidden"}
        assert shown <= set(schemas[name]["properties"])
        assert not {field for field, kind in table.items() if kind == "hidden"} & set(schemas[name]["properties"])


# -- bounds: the document against the API ---------------------------------------------------------------------
def _bounds(schema: dict[str, Any]) -> Iterator[tuple[Any, bool]]:
    """(value, accepted) pairs at each bound a property schema declares: just outside and just inside."""
    branches = schema.get("anyOf", [schema])
    for branch in branches:
        kinds = branch.get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        step = 1 if "integer" in kinds else 0.5
        if "minimum" in branch:
            yield branch["minimum"] - step, False
            yield branch["minimum"], True
        if "exclusiveMinimum" in branch:
            yield branch["exclusiveMinimum"], False
            yield branch["exclusiveMinimum"] + step, True
        if "maximum" in branch:
            yield branch["maximum"] + step, False
            yield branch["maximum"], True
        if "maxLength" in branch and "pattern" not in branch:
            yield "x" * (branch["maxLength"] + 1), False
            yield "x" * branch["maxLength"], True
        if "enum" in branch:
            for value in branch["enum"]:
                yield value, True
            yield "no-such-" + str(branch["enum"][0]), False
        if "integer" in kinds and "number" not in kinds and not any("number" in str(b.get("type")) for b in branches):
            yield 1.5, False


def _pattern_probes(pattern: str) -> Iterator[tuple[str, bool]]:
    """Strings tried against a pattern; whether each should pass is what the pattern itself says."""
    for text in ("simulation", "a" * 128, "a" * 129, "a:b", "-a", "a b", "sim\n", "é", "A1_.-z"):
        yield text, re.fullmatch(pattern.strip("^$"), text) is not None and "\n" not in text


def _probe_submission(api: falcon.testing.TestClient, body: dict[str, Any], accepted: bool, field: str) -> None:
    result = api.simulate_post("/api/jobs", json=body)
    if accepted:
        assert result.status_code == 201, (body, result.text)
    else:
        assert result.status_code == 400, (body, result.text)
        assert result.json["field"] == field, (body, result.json)


def test_submission_bounds_are_enforced(api: falcon.testing.TestClient) -> None:
    schemas = served(api)["components"]["schemas"]
    submission = schemas["Submission"]
    probed = set()
    for name, prop in submission["properties"].items():
        if "$ref" in str(prop) or prop.get("type") == ["object", "null"]:
            continue
        for value, accepted in _bounds(prop):
            probed.add(name)
            _probe_submission(api, {"service_required": "simulation", name: value}, accepted, name)
        if "pattern" in prop:
            for text, accepted in _pattern_probes(prop["pattern"]):
                probed.add(name)
                _probe_submission(api, {name: text}, accepted, "service_required")
    assert {"priority", "max_retries", "timeout_seconds", "customer_id", "workflow_id", "workflow_priority",
            "workflow_datetime", "step_number", "service_required", "job_type", "type"} <= probed
    assert api.simulate_post("/api/jobs", json={"priority": 1}).json["field"] == "service_required"


def test_payload_bounds_are_enforced(api: falcon.testing.TestClient) -> None:
    schemas = served(api)["components"]["schemas"]
    rules = schemas["Submission"]["allOf"]
    assert [rule["if"]["properties"]["service_required"]["const"] for rule in rules] == ["comfyui", "simulation"]
    payload = schemas["SimulationPayload"]
    probed = set()
    for name, prop in payload["properties"].items():
        for value, accepted in _bounds(prop):
            probed.add(name)
            _probe_submission(api, {"service_required": "simulation", "payload": {name: value}}, accepted,
                              f"payload.{name}")
        if "boolean" in str(prop):
            _probe_submission(api, {"service_required": "simulation", "payload": {name: "yes"}}, False,
                              f"payload.{name}")
    assert probed == {"duration", "simulation_time", "steps", "fail"}


def test_requirement_bounds_are_enforced(api: falcon.testing.TestClient) -> None:
    schemas = served(api)["components"]["schemas"]
    requirements = schemas["Requirements"]
    for name, prop in requirements["properties"].items():
        for value, accepted in _bounds(prop):
            body = {"service_required": "simulation", "requirements": {name: value}}
            _probe_submission(api, body, accepted, f"requirements.{name}")
    for key, accepted in (("custom.region", True), ("a.b.c.d.e.f.g.h", True), ("a.b.c.d.e.f.g.h.i", False),
                          ("nodot", False), ("bad.se gment", False)):
        body = {"service_required": "simulation", "requirements": {key: "x"}}
        assert any(re.fullmatch(p.strip("^$"), key) for p in requirements["patternProperties"]) is accepted
        _probe_submission(api, body, accepted, f"requirements.{key}")
    many = {f"custom.k{i}": 1 for i in range(requirements["maxProperties"] + 1)}
    _probe_submission(api, {"service_required": "simulation", "requirements": many}, False, "requirements")
    many.popitem()
    _probe_submission(api, {"service_required": "simulation", "requirements": many}, True, "requirements")


def test_list_query_bounds_are_enforced(api: falcon.testing.TestClient) -> None:
    op = served(api)["paths"]["/api/jobs"]["get"]
    probed = set()
    for param in op["parameters"]:
        name = param["name"]
        for value, accepted in _bounds(param["schema"]):
            if isinstance(value, float):
                continue
            probed.add(name)
            result = api.simulate_get("/api/jobs", params={name: str(value)})
            assert result.status_code == (200 if accepted else 400), (name, value, result.text)
        if "pattern" in param["schema"]:
            for text, accepted in _pattern_probes(param["schema"]["pattern"]):
                probed.add(name)
                result = api.simulate_get("/api/jobs", params={name: text})
                assert result.status_code == (200 if accepted else 400), (name, text, result.text)
    assert probed == {"status", "service_required", "limit", "offset"}


# -- answers conform ----------------------------------------------------------------------------------------------
def test_answers_match_their_schemas(api: falcon.testing.TestClient, queue: Queue) -> None:
    """A job through its life (claimed, progressing, completed), a worker, health and errors, each valid against
    the schema the document gives its answer."""
    doc = served(api)
    worker = FakeWorker(queue)
    body = {"service_required": "simulation", "priority": 7, "timeout_seconds": 60,
            "payload": {"steps": 4}, "workflow_id": "w",
            "workflow_datetime": "1700000000000", "step_number": 2, "workflow_priority": 3}
    result = api.simulate_post("/api/jobs", json=body)
    validator(doc, "Submitted").validate(result.json)
    job_id = result.json["job_id"]
    api.simulate_post("/api/jobs", json={"service_required": "simulation", "requirements": {"gpu_count": 1},
                                         "customer_id": "c1"})
    assert worker.claim() == job_id
    worker.progress(job_id, 50, "half", 2, 4)
    seen = [api.simulate_get(f"/api/jobs/{job_id}").json]
    worker.complete(job_id, {"images": ["a.png"]})
    seen.append(api.simulate_get(f"/api/jobs/{job_id}").json)
    for answer in seen:
        validator(doc, "JobAnswer").validate(answer)
    assert seen[-1]["job"]["status"] == "completed" and seen[-1]["job"]["current_step"] == 2
    validator(doc, "JobList").validate(api.simulate_get("/api/jobs").json)
    validator(doc, "WorkerList").validate(api.simulate_get("/api/workers").json)
    validator(doc, "Health").validate(api.simulate_get("/health").json)
    pending = api.simulate_get("/api/jobs", params={"status": "pending"}).json["jobs"][0]["id"]
    validator(doc, "Cancelled").validate(api.simulate_delete(f"/api/jobs/{pending}").json)
    for result in (api.simulate_get("/api/jobs/nope"), api.simulate_delete(f"/api/jobs/{job_id}"),
                   api.simulate_post("/api/jobs", json={"priority": -1}), api.simulate_get("/api/nope"),
                   api.simulate_get(f"/api/jobs/{job_id}/outputs/x.png")):
        assert result.status_code >= 400
        validator(doc, "Error").validate(result.json)


# -- /docs -------------------------------------------------------------------------------------------------------
def test_docs_page_lists_everything_and_fetches_nothing(api: falcon.testing.TestClient) -> None:
    result = api.simulate_get("/docs")
    assert result.status_code == 200 and result.headers["content-type"].startswith("text/html")
    page = result.text
    doc = served(api)
    for path, item in doc["paths"].items():
        assert f"<code>{path}</code>" in page, path
        for method in item:
            if method in METHODS:
                assert item[method]["operationId"] in page
    for name in doc["components"]["schemas"]["Submission"]["properties"]:
        assert f"<code>{name}</code>" in page, name
    for socket in doc["x-websocket"]["sockets"].values():
        for kind in socket["messages"]:
            assert f"<code>{kind}</code>" in page, kind
    for header in ("X-API-Key", "token", "Bearer"):
        assert header in page
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


# -- WebSocket messages: the document against the sockets' own handlers -------------------------------------------
def test_websocket_messages_are_the_handlers(env_base: dict[str, str]) -> None:
    """Each socket's documented message types are exactly those it handles (its `supported` list)."""
    sockets = document()["x-websocket"]["sockets"]
    with running_api(env_base) as live:
        for path, socket in sockets.items():
            ws = ws_connect(live, path.replace("{client_id}", "c1").replace("{monitor_id}", "m1"))
            try:
                assert recv(ws)["type"] == "connected"
                send(ws, {"type": "no-such-message", "id": 5})
                error, _ = recv_until(ws, "error")
                assert error["message_id"] == 5
                assert sorted(socket["messages"]) == error["supported"], path
            finally:
                ws.close()


def test_served_document_is_json(api: falcon.testing.TestClient) -> None:
    assert orjson.loads(api.simulate_get("/openapi.json").content) == document()
