"""Builds the API: `create_app` wires objects (tests call it); `get_app` reads settings for gunicorn."""

from __future__ import annotations

from typing import Any

import falcon

from appliance.api import capacity, errors
from appliance.api.auth import AuthMiddleware, OriginMiddleware, guard_for
from appliance.api.docs import DocsPage
from appliance.api.limits import JsonBodies, Limits
from appliance.api.live import ConnectionStats, LiveApp, LiveServices, create_live
from appliance.api.openapi import OpenApiDocument
from appliance.api.outputs import JobOutput, JobPreview
from appliance.api.resources import Health, JobCollection, JobItem, WorkerCollection
from appliance.api.sse import JobProgress
from appliance.api.ws_session import Live
from appliance.queue import Queue
from appliance.redis_conn import connect
from appliance.settings import ApiSettings


def create_app(settings: ApiSettings, queue: Queue,
               live: Live | None = None) -> falcon.App[falcon.Request, falcon.Response]:
    """The Falcon app over an existing queue client; opens no connection itself.

    With `live` (the process's stream reader and connection registry) it also serves job progress as SSE
    and the connection counts."""
    middleware: list[Any] = [OriginMiddleware(guard_for(settings)), JsonBodies(), AuthMiddleware(settings, queue)]
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    capacity.attach(queue, settings.submit_memory_percent)
    app.add_error_handler(capacity.QueueFull, capacity.handle_full)
    tasks = live.tasks if live is not None else None
    limits = live.limits if live is not None else Limits(settings)
    queue.classes.max_per_service = settings.max_classes_per_service
    app.add_route("/health", Health(queue, settings.queue.redis_url_redacted, tasks))
    app.add_route("/api/health", Health(queue, settings.queue.redis_url_redacted, tasks))
    app.add_route("/api/jobs", JobCollection(queue, limits))
    app.add_route("/api/jobs/{job_id}", JobItem(queue))
    app.add_route("/api/workers", WorkerCollection(queue))
    app.add_route("/api/jobs/{job_id}/outputs/{name}", JobOutput(queue))
    app.add_route("/api/jobs/{job_id}/preview", JobPreview(queue))
    app.add_route("/openapi.json", OpenApiDocument(keys=bool(settings.api_keys)))
    app.add_route("/docs", DocsPage(keys=bool(settings.api_keys)))
    if live is not None:
        app.add_route("/api/jobs/{job_id}/progress", JobProgress(live))
        app.add_route("/api/connection-stats", ConnectionStats(live))
    return app


def get_app(settings: ApiSettings | None = None) -> LiveApp:
    """The WSGI app gunicorn serves: Falcon for HTTP and SSE, WebSocket upgrades on any path."""
    settings = settings or ApiSettings.from_env()
    client = connect(settings.queue.redis_url, max_connections=64, timeout_s=1.0)
    queue = Queue(client, settings.queue)
    live = create_live(settings, queue)
    services = LiveServices(live)
    services.start()
    return LiveApp(create_app(settings, queue, live), live, services)
