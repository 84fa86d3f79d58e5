"""The HTTP, Server-Sent Events and WebSocket API (Falcon WSGI app served by gunicorn's gevent worker)."""
