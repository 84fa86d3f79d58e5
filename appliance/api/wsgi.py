"""The WSGI callable gunicorn serves (`appliance.api.wsgi:app`), built once per gunicorn worker process."""

from __future__ import annotations

from appliance.api.app import get_app

app = get_app()
