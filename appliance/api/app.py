"""Builds the API: `create_app` wires objects (tests call it); `get_app` reads settings for gunicorn."""

from __future__ import annotations

import falcon

from appliance.api import errors
from appliance.api.resources import Health, JobCollection, JobItem, WorkerCollection
from appliance.queue import Queue
from appliance.redis_conn import connect
from appliance.settings import ApiSettings


def create_app(settings: ApiSettings, queue: Queue) -> falcon.App:
    """The Falcon app over an existing queue client; opens no connection itself."""
    origins = "*" if "*" in settings.cors_origins else list(settings.cors_origins)
    app = falcon.App(middleware=[falcon.CORSMiddleware(allow_origins=origins, allow_credentials=None)])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    app.add_route("/health", Health(queue, settings.queue.redis_url_redacted))
    app.add_route("/api/health", Health(queue, settings.queue.redis_url_redacted))
    app.add_route("/api/jobs", JobCollection(queue, settings.max_body_bytes))
    app.add_route("/api/jobs/{job_id}", JobItem(queue))
    app.add_route("/api/workers", WorkerCollection(queue))
    return app


def get_app(settings: ApiSettings | None = None) -> falcon.App:
    settings = settings or ApiSettings.from_env()
    client = connect(settings.queue.redis_url, max_connections=64)
    return create_app(settings, Queue(client, settings.queue))
