"""GET /api/jobs/{job_id}/outputs/{name}: download a file a job produced (e.g. a ComfyUI image); GET
/api/jobs/{job_id}/preview: a running job's latest preview image (ComfyUI's live previews)."""

from __future__ import annotations

import falcon
import orjson

from appliance.api.errors import echo, envelope
from appliance.errors import shown
from appliance.outputs import OutputStore
from appliance.queue import Queue


class JobOutput:
    """Serves a job's stored output file with its content type; 404 in the usual envelope if missing."""

    def __init__(self, queue: Queue):
        self.store = OutputStore(queue.client, queue.keys, queue.settings.completed_ttl_s)

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str, name: str) -> None:
        found = self.store.get(job_id, name)
        if found is None:
            resp.status = falcon.HTTP_404
            resp.content_type = falcon.MEDIA_JSON
            message = (f"No output {shown(name)} for job {shown(job_id)} (it may have expired; the job's result "
                       "lists its files)")
            resp.data = orjson.dumps(envelope(message, job_id=echo(job_id), name=echo(name)))
            return
        resp.content_type = found.content_type
        resp.set_header("Content-Disposition", f'attachment; filename="{found.name}"')
        resp.data = found.data


class JobPreview:
    """Serves a running job's latest preview image; 404 in the usual envelope when there is none (yet)."""

    def __init__(self, queue: Queue):
        self.store = OutputStore(queue.client, queue.keys, queue.settings.completed_ttl_s)

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        found = self.store.get_preview(job_id)
        if found is None:
            resp.status = falcon.HTTP_404
            resp.content_type = falcon.MEDIA_JSON
            message = (f"No preview for job {shown(job_id)} (previews exist while a job runs, if its workflow sends "
                       "them; each `preview` event says a new one is there)")
            resp.data = orjson.dumps(envelope(message, job_id=echo(job_id)))
            return
        resp.content_type = found.content_type
        resp.set_header("Cache-Control", "no-store")
        resp.data = found.data
