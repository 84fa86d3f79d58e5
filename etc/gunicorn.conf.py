# gunicorn configuration of the appliance API (Falcon WSGI app, gevent worker class).
# Values come from the API settings (API_PORT, API_BIND, API_PROCESSES, LOG_LEVEL, ...), parsed once.
import sys
from urllib.parse import urlsplit

from gunicorn.glogging import Logger

from appliance.api import gunicorn_errors
from appliance.logs import log_format, setup_logging
from appliance.settings import ApiSettings, SettingsError, redact_token

try:
    _settings = ApiSettings.from_env()
except SettingsError as _exc:
    print(f"api: bad setting: {_exc}", file=sys.stderr)
    sys.exit(2)

# -- server socket ---------------------------------------------------------------------------------
bind = [f"{_settings.bind}:{_settings.port}"]
backlog = 2048

# -- worker processes ------------------------------------------------------------------------------
worker_class = "gevent"                             # HTTP, SSE and WebSocket on one port, one greenlet each
workers = _settings.processes                       # API_PROCESSES (default 1)
worker_connections = _settings.worker_connections  # open connections per process (default 10000)
timeout = 30                                        # gevent workers heartbeat the arbiter themselves
graceful_timeout = _settings.graceful_timeout_s     # TERM: finish requests, close streams (default 10)
keepalive = 5

# -- request limits --------------------------------------------------------------------------------
# gunicorn refuses requests over these by itself; its answers are the API's JSON envelope (gunicorn_errors)
limit_request_line = 4094                           # request line, bytes: 414 beyond (default 4094)
limit_request_fields = 100                          # header fields: 431 beyond (default 100)
limit_request_field_size = 8190                     # one header field, bytes: 431 beyond (default 8190)
gunicorn_errors.install(max_chunk_bytes=_settings.max_body_bytes)  # a larger chunk: 413 at once

# -- control socket --------------------------------------------------------------------------------
control_socket_disable = True                       # one per host by default; two appliances would clash

# -- logging ---------------------------------------------------------------------------------------
# gunicorn's lines and the app's in the format of every appliance log (time, level, program, logger).
# A logger class rather than logconfig_dict: with logconfig_dict gunicorn builds the access-log fields of
# every request even while the access log is off.
_secrets = gunicorn_errors.SecretFilter(
    [key.key for key in _settings.api_keys] + [urlsplit(_settings.queue.redis_url).password or ""])


class ApplianceLogger(Logger):
    error_fmt = log_format("api %(process)d")
    access_fmt = log_format("api %(process)d")  # its message is the request in access_log_format
    datefmt = None                                  # logging's default, as in the workers' lines

    def __init__(self, cfg):
        super().__init__(cfg)
        # gunicorn logs an invalid request with its request or header line: keys never reach the log
        self.error_log.addFilter(_secrets)
        self.access_log.addFilter(_secrets)

    def atoms(self, resp, req, environ, request_time):
        """The access-log fields with API keys left out: `?token=` values, Authorization, X-API-Key."""
        atoms = super().atoms(resp, req, environ, request_time)
        for name in ("r", "q", "f"):
            if isinstance(atoms.get(name), str):
                atoms[name] = _secrets.redact(redact_token(atoms[name]))
        for name in ("{authorization}i", "{x-api-key}i"):
            if name in atoms:
                atoms[name] = "***"
        return atoms


setup_logging(_settings.queue.log_level, "api %(process)d")  # the app's loggers (the root logger)
logger_class = ApplianceLogger
errorlog = "-"
accesslog = "-" if _settings.access_log else None   # API_ACCESS_LOG=1: one line per request
loglevel = _settings.queue.log_level
proc_name = "appliance-api"


def when_ready(server):
    """Say who may use the API (keys or not, and where it listens)."""
    log = server.log.info if _settings.api_keys or _settings.bind in ("127.0.0.1", "::1") else server.log.warning
    log("api: %s", _settings.access_note())


# -- graceful stop of live connections ------------------------------------------------------------
def post_worker_init(worker):
    """On TERM (worker.alive goes False), close WebSockets with 1001 and end SSE streams, so clients reconnect
    at once instead of waiting for graceful_timeout and an EOF."""
    import gevent

    def watch():
        while worker.alive:
            gevent.sleep(0.2)
        shutdown = getattr(worker.wsgi, "shutdown", None)
        if shutdown is not None:
            told = shutdown()
            worker.log.info("api: closing %d live connections for shutdown", told)

    gevent.spawn(watch)
