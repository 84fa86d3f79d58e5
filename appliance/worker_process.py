"""Entry point of one worker process: `python -m appliance.worker_process` (supervisord runs it).

A stop signal is caught from the first line on: one that arrives before the worker's own handlers are installed
is remembered, and the worker then exits without registering. supervisord may also send SIGTERM before this
process exists as Python (between its fork and exec, where the signal is lost): the worker asks supervisord
whether it is being stopped before it registers.

The environment is read once, here: the worker's settings (`WorkerSettings`) and those of each connector named
in WORKER_CONNECTORS (`appliance.connector.connector_settings`) are parsed before anything starts and handed down.

Exit status: 0 after a clean stop, 1 after an error that is not a Redis outage (logged), 2 for a bad setting
(one line naming it).
"""

import signal

_stops: list[int] = []
signal.signal(signal.SIGTERM, lambda signum, frame: _stops.append(signum))
signal.signal(signal.SIGINT, lambda signum, frame: _stops.append(signum))

from gevent import monkey

monkey.patch_all()

import logging
import os
import sys
import time
import xmlrpc.client
from typing import Any

import gevent

from appliance.connector import connector_settings, load_connectors
from appliance.logs import setup_logging
from appliance.redis_conn import connect
from appliance.retry import ERROR_PAUSE_S
from appliance.settings import SettingsError, WorkerSettings
from appliance.worker import Worker

log = logging.getLogger(__name__)


def stop_requested(settings: WorkerSettings) -> bool:
    """Whether a stop came before the worker's handlers were installed: caught by the early handler above, or
    sent by supervisord before this process could catch it (supervisord marks the process STOPPING before it
    signals it, so a stop asked for after this question reaches the worker's handlers)."""
    if _stops:
        return True
    if not settings.supervisor_url or not settings.supervisor_process:
        return False
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, settings.supervisor_url)
    try:
        rpc: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        info = rpc.supervisor.getProcessInfo(settings.supervisor_process)
        return str(info.get("statename")) == "STOPPING"
    except (OSError, xmlrpc.client.Error) as exc:
        log.warning("could not ask supervisord whether this worker is being stopped: %s", exc)
        return False
    finally:
        transport.close()


def main() -> int:
    env = dict(os.environ)  # read here only: everything below gets parsed settings
    try:
        settings = WorkerSettings.from_env(env)
        connectors = load_connectors(connector_settings(settings.connectors, env))
    except SettingsError as exc:
        print(f"worker: bad setting: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.queue.log_level, f"worker {settings.worker_id}")
    missing = [s for s in settings.services if not any(s in c.services for c in connectors.values())]
    if missing:
        log.warning("WORKER_SERVICES lists %s but no loaded connector serves it; add its connector to "
                    "WORKER_CONNECTORS", ",".join(missing))
    client = connect(settings.queue.redis_url, max_connections=settings.max_concurrent_jobs + 8)
    listener = connect(settings.queue.redis_url, blocking=True, max_connections=2)
    worker = Worker(settings, client, listener, connectors)
    code = worker.run(lambda: stop_requested(settings))
    if code == 1 and not worker.draining:
        # past supervisord's startsecs, so that it starts the worker again however often this happens, and the
        # log shows one restart every few seconds rather than a burst that ends in FATAL
        log.info("exiting in %.0fs; supervisord starts the worker again", ERROR_PAUSE_S)
        deadline = time.monotonic() + ERROR_PAUSE_S
        while not worker.draining and time.monotonic() < deadline:
            gevent.sleep(0.2)
    return code


if __name__ == "__main__":
    sys.exit(main())
