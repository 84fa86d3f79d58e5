"""Entry point of one worker process: `python -m appliance.worker_process` (supervisord runs it)."""

from gevent import monkey

monkey.patch_all()

import logging
import sys

from appliance.connector import load_connectors
from appliance.logs import setup_logging
from appliance.redis_conn import connect
from appliance.settings import SettingsError, WorkerSettings
from appliance.worker import Worker


def main() -> int:
    try:
        settings = WorkerSettings.from_env()
        connectors = load_connectors(settings.connectors, settings.env)
    except SettingsError as exc:
        print(f"worker: bad setting: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.queue.log_level, f"worker {settings.worker_id}")
    missing = [s for s in settings.services if not any(s in c.services for c in connectors.values())]
    if missing:
        logging.getLogger(__name__).warning(
            "WORKER_SERVICES lists %s but no loaded connector serves it; add its connector to WORKER_CONNECTORS",
            ",".join(missing))
    client = connect(settings.queue.redis_url, max_connections=settings.max_concurrent_jobs + 8)
    listener = connect(settings.queue.redis_url, blocking=True, max_connections=2)
    Worker(settings, client, listener, connectors).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
