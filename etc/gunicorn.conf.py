# gunicorn configuration of the appliance API (Falcon WSGI app, gevent worker class).
# Values come from the API settings (API_PORT, API_BIND, API_PROCESSES, LOG_LEVEL, ...), parsed once.
import sys

from appliance.settings import ApiSettings, SettingsError

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

# -- control socket --------------------------------------------------------------------------------
control_socket_disable = True                       # one per host by default; two appliances would clash

# -- logging ---------------------------------------------------------------------------------------
errorlog = "-"
accesslog = None
loglevel = _settings.queue.log_level
proc_name = "appliance-api"
