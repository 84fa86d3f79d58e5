"""A protocol-faithful ComfyUI test double: ComfyUI's HTTP routes, WebSocket messages and execution order.

HTTP (also under /api/): POST /prompt (validation before queueing: 400 shapes, 500 on a non-JSON body or a
graph it cannot read, such as a UI-format workflow), GET /queue, POST /queue (delete pending / clear),
GET /prompt, POST /interrupt, GET /history[/{id}], POST /history, GET /view, GET /system_stats,
GET /object_info[/{Class}], GET /models (model folder names), GET /models/{folder} (its files; 404 for an
unknown folder), POST /upload/image (multipart: image, subfolder, type, overwrite; into `files` as "input").
WebSocket /ws?clientId=X with the
real routing rules: per-prompt events go only to the socket whose sid is the prompt's client_id (dropped if
none), `status` is broadcast, a reconnect during a run gets `status` then `executing {node}` without
prompt_id; binary previews (event 1, or 4 after the feature-flag handshake).

Nodes it runs (enough for the message sequences in the reference): EmptyImage, ImageScale (needs width),
LoadImage (its `image`, "subfolder/name" or "name", must have been uploaded: else custom_validation_failed),
WorkerTestSleepProgress (inputs image, steps, step_s, fail_at_step, seed, send_preview, drop_socket_at_step),
SaveImage / PreviewImage (output nodes). A node whose class_type and inputs are unchanged since an earlier
run, with all its inputs cached, is served from the cache (`execution_cached`, no `executing`).

Runs in threads (one executor, strict FIFO by number), so tests need no event loop.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import itertools
import json
import socket
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")
NODES = {"EmptyImage": {"required": []}, "ImageScale": {"required": ["image", "width"]},
         "WorkerTestSleepProgress": {"required": ["image", "steps"]}, "SaveImage": {"required": ["images"]},
         "PreviewImage": {"required": ["images"]}, "LoadImage": {"required": ["image"]},
         "CheckpointLoaderSimple": {"required": ["ckpt_name"]}}
OUTPUT_NODES = {"SaveImage": "output", "PreviewImage": "temp"}
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MODELS = {"checkpoints": ["sd_xl_base_1.0.safetensors", "v1-5-pruned.safetensors"],
          "loras": ["detail_tweaker.safetensors"], "vae": [], "configs": ["v1-inference.yaml"],
          "custom_nodes": ["example_node.py.example"]}


class Socket:
    """One WebSocket session (after the handshake), framed by wsproto."""

    def __init__(self, sock: socket.socket, sid: str):
        self.sock, self.sid = sock, sid
        self.ws = Connection(ConnectionType.SERVER)
        self.lock = threading.Lock()
        self.feature_flags = False
        self.first_frame = True
        self.open = True

    def send_json(self, message: dict[str, Any]) -> None:
        self._send(TextMessage(data=json.dumps(message)))

    def send_bytes(self, data: bytes) -> None:
        self._send(BytesMessage(data=data))

    def _send(self, event: Any) -> None:
        with self.lock:
            if not self.open:
                return
            try:
                self.sock.sendall(self.ws.send(event))
            except (OSError, LocalProtocolError):  # gone, or closing (as ComfyUI drops such a socket)
                self.open = False

    def drop(self) -> None:
        """The network drops: the TCP connection goes away without a close handshake."""
        self.open = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class ComfyDouble:
    """The fake server. `start()` binds 127.0.0.1 on a free port; `url` is its base URL."""

    def __init__(self, auth: tuple[str, str] | None = None, port: int = 0):
        self.auth = auth
        self.lock = threading.Condition()
        self.sockets: list[Socket] = []
        self.pending: list[dict[str, Any]] = []
        self.running: dict[str, Any] | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.cache: dict[str, Any] = {}
        self.counter = itertools.count(1)
        self.numbers = itertools.count(0)
        self.interrupt_flag = False
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, body) as received, for assertions
        self.healthy = True
        self.refuse_ws = False  # a test sets this to keep a dropped client away for a while
        self.closed = False
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                double._http(self, "GET")

            def do_POST(self) -> None:
                double._http(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads = [threading.Thread(target=self.server.serve_forever, daemon=True),
                         threading.Thread(target=self._executor, daemon=True)]

    def start(self) -> ComfyDouble:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """ComfyUI's process ends: sockets drop, and nothing listens at the port any more (connections refused)."""
        if self.closed:
            return
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        for s in list(self.sockets):
            s.drop()
        self.server.shutdown()
        self.server.server_close()

    # -- HTTP ---------------------------------------------------------------------------------------------
    def _http(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        path = parts.path[4:] if parts.path.startswith("/api/") else parts.path
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if self.auth and handler.headers.get("Authorization") != "Basic " + base64.b64encode(
                f"{self.auth[0]}:{self.auth[1]}".encode()).decode():
            return self._reply(handler, 401, b"401: Unauthorized", "text/plain")
        if method == "GET" and path == "/ws":
            if self.refuse_ws:
                return self._reply(handler, 503, b"503: Service Unavailable", "text/plain")
            return self._websocket(handler, query.get("clientId") or uuid.uuid4().hex)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        body: Any = None
        if method == "POST" and path == "/upload/image":
            return self._upload(handler, raw)
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                return self._reply(handler, 500, b"500 Internal Server Error", "text/plain")
        self.requests.append((method, path, body))
        route = getattr(self, f"_{method.lower()}_{path.strip('/').split('/')[0] or 'root'}", None)
        if route is None:
            return self._reply(handler, 404, b"404: Not Found", "text/plain")
        try:
            status, payload, content_type = route(path, query, body)
        except Exception:  # ComfyUI's server answers an exception in a handler so (a graph it cannot read)
            return self._reply(handler, 500, b"500 Internal Server Error", "text/plain")
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self._reply(handler, status, data, content_type)

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, data: bytes, content_type: str) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _upload(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        """POST /upload/image: multipart with `image` (a file), `subfolder`, `type`, `overwrite`."""
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + handler.headers.get("Content-Type", "").encode() + b"\r\n\r\n" + raw)
        fields: dict[str, Any] = {}
        image: tuple[str, bytes] | None = None
        for part in message.iter_parts() if message.is_multipart() else []:
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True) or b""
            if name == "image" and part.get_filename():
                image = (str(part.get_filename()), data)
            elif name:
                fields[str(name)] = data.decode()
        if image is None:
            self.requests.append(("POST", "/upload/image", fields))
            return self._reply(handler, 400, b"400: Bad Request", "text/plain")
        kind, subfolder = fields.get("type") or "input", fields.get("subfolder", "")
        self.requests.append(("POST", "/upload/image", {**fields, "filename": image[0], "size": len(image[1])}))
        self.files[(kind, subfolder, image[0])] = image[1]
        data = json.dumps({"name": image[0], "subfolder": subfolder, "type": kind}).encode()
        self._reply(handler, 200, data, "application/json")

    def _get_models(self, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str]:
        parts = path.strip("/").split("/")
        if len(parts) == 1:
            return 200, list(MODELS), "application/json"
        if parts[1] not in MODELS:
            return 404, b"", "text/plain"
        return 200, MODELS[parts[1]], "application/json"

    def _post_prompt(self, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str]:
        body = body if isinstance(body, dict) else {}
        if "prompt" not in body:
            return self._invalid("no_prompt", "No prompt provided", "")
        prompt = body["prompt"]
        error = self._validate(prompt)
        if error:
            return 400, error, "application/json"
        client_id = body.get("client_id") or (body.get("extra_data") or {}).get("client_id")
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        number = next(self.numbers)
        item = {"number": -number if body.get("front") else number, "prompt_id": prompt_id, "prompt": prompt,
                "extra_data": {"client_id": client_id} if client_id else {}, "client_id": client_id,
                "outputs": [n for n, node in prompt.items() if node["class_type"] in OUTPUT_NODES]}
        with self.lock:
            self.pending.append(item)
            self.pending.sort(key=lambda i: i["number"])
            self.lock.notify_all()
        self._status()
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": {}}, "application/json"

    def _invalid(self, kind: str, message: str, details: str) -> tuple[int, Any, str]:
        return 400, {"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
                     "node_errors": {}}, "application/json"

    def _validate(self, prompt: Any) -> dict[str, Any] | None:
        if not isinstance(prompt, dict):
            return {"error": {"type": "invalid_prompt", "message": "Invalid prompt", "details": "",
                              "extra_info": {}}, "node_errors": {}}
        for node_id, node in prompt.items():
            if "class_type" not in node:
                return {"error": {"type": "invalid_prompt", "message": "Cannot execute because a node is missing "
                                  "the class_type property.", "details": f"Node ID '#{node_id}'", "extra_info": {}},
                        "node_errors": {}}
            if node["class_type"] not in NODES:
                return {"error": {"type": "invalid_prompt", "message": f"Cannot execute because node "
                                  f"{node['class_type']} does not exist.", "details": f"Node ID '#{node_id}'",
                                  "extra_info": {}}, "node_errors": {}}
        outputs = [n for n, node in prompt.items() if node["class_type"] in OUTPUT_NODES]
        if not outputs:
            return {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                              "extra_info": {}}, "node_errors": {}}
        node_errors = {}
        for node_id, node in prompt.items():
            missing = [name for name in NODES[node["class_type"]]["required"] if name not in node.get("inputs", {})]
            image = node.get("inputs", {}).get("image")
            if node["class_type"] == "LoadImage" and not missing and ("input", *(
                    image.rsplit("/", 1) if "/" in image else ("", image))) not in self.files:
                node_errors[node_id] = {"errors": [{"type": "custom_validation_failed",
                                                    "message": "Custom validation failed for node",
                                                    "details": f"image - Invalid image file: {image}",
                                                    "extra_info": {"input_name": "image"}}],
                                        "dependent_outputs": outputs, "class_type": "LoadImage"}
            if missing:
                node_errors[node_id] = {"errors": [{"type": "required_input_missing",
                                                    "message": "Required input is missing", "details": missing[0],
                                                    "extra_info": {"input_name": missing[0]}}],
                                        "dependent_outputs": outputs, "class_type": node["class_type"]}
        if node_errors:
            return {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed "
                              "validation", "details": "", "extra_info": {}}, "node_errors": node_errors}
        return None

    def _get_prompt(self, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str]:
        return 200, {"exec_info": {"queue_remaining": self._remaining()}}, "application/json"

    def _get_queue(self, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str]:
        with self.lock:
            running = [self._queue_item(self.running)] if self.running else []
            pending = [self._queue_item(i) for i in self.pending]
        return 200, {"queue_running": running, "queue_pending": pending}, "application/json"

    @staticmethod
    def _queue_item(item: dict[str, Any]) -> list[Any]:
        return [item["number"], item["prompt_id"], item["prompt"], item["extra_data"], item["outputs"]]

    def _post_queue(self, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str]:
        with self.lock:
            if (body or {}).get("clear"):
                self.pending.clear()
            for prompt_id in (body or {}).get("delete", []):
                self.pending = [i for i in self.pending if i["prompt_id"] != prompt_id]
        self._status()
        return 200, b"", "text/plain"

    def _post_interrupt(self, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str]:
        with self.lock:
            wanted = (body or {}).get("prompt_id")
            if self.running and (wanted is None or wanted == self.running["prompt_id"]):
                self.interrupt_flag = True
        return 200, b"", "text/plain"

    def _get_history(self, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str]:
        parts = path.strip("/").split("/")
        with self.lock:
            if len(parts) > 1:
                entry = self.history.get(parts[1])
                return 200, ({parts[1]: entry} if entry else {}), "application/json"
            items = list(self.history.items())
        if "max_items" in query:
            items = items[-int(query["max_items"]):]
        return 200, dict(items), "application/json"

    def _post_history(self, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str]:
        with self.lock:
            if (body or {}).get("clear"):
                self.history.clear()
            for prompt_id in (body or {}).get("delete", []):
                self.history.pop(prompt_id, None)
        return 200, b"", "text/plain"

    def _get_view(self, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str]:
        name = query.get("filename", "")
        if ".." in name or name.startswith("/"):
            return 400, b"400: Bad Request", "text/plain"
        data = self.files.get((query.get("type", "output"), query.get("subfolder", ""), name))
        if data is None:
            return 404, b"404: Not Found", "text/plain"
        return 200, data, "image/png"

    def _get_system_stats(self, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str]:
        if not self.healthy:
            return 500, b"500 Internal Server Error", "text/plain"
        return 200, {"system": {"os": "posix", "ram_total": 8 * 1024**3, "ram_free": 4 * 1024**3,
                                "comfyui_version": "0.3.64", "python_version": "3.11", "pytorch_version": "2.13.0+cpu",
                                "embedded_python": False, "argv": ["main.py", "--cpu"]},
                     "devices": [{"name": "cpu", "type": "cpu", "index": None, "vram_total": 0, "vram_free": 0,
                                  "torch_vram_total": 0, "torch_vram_free": 0}]}, "application/json"

    def _get_object_info(self, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str]:
        info = {name: {"input": {"required": {i: ["*"] for i in spec["required"]}}, "name": name,
                       "output_node": name in OUTPUT_NODES} for name, spec in NODES.items()}
        info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] = [["sd_xl_base_1.0.safetensors",
                                                                            "v1-5-pruned.safetensors"]]
        parts = path.strip("/").split("/")
        if len(parts) > 1:
            return 200, ({parts[1]: info[parts[1]]} if parts[1] in info else {}), "application/json"
        return 200, info, "application/json"

    # -- WebSocket ----------------------------------------------------------------------------------------
    def _websocket(self, handler: BaseHTTPRequestHandler, sid: str) -> None:
        key = handler.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        handler.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        handler.wfile.flush()
        handler.close_connection = True
        ws = Socket(handler.connection, sid)
        ws.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": self._remaining()}},
                                                 "sid": sid}})
        with self.lock:
            self.sockets.append(ws)
            running = self.running
            if running and running["client_id"] == sid and running.get("node"):
                ws.send_json({"type": "executing", "data": {"node": running["node"]}})
        try:
            while ws.open:
                data = ws.sock.recv(65536)
                if not data:
                    break
                ws.ws.receive_data(data)
                for event in ws.ws.events():
                    if isinstance(event, TextMessage):
                        self._client_text(ws, event.data)
                    elif isinstance(event, Ping):
                        ws._send(event.response())
                    elif isinstance(event, CloseConnection):
                        ws._send(event.response())
                        ws.open = False
        except OSError:
            pass
        finally:
            ws.open = False
            with self.lock:
                if ws in self.sockets:
                    self.sockets.remove(ws)

    def _client_text(self, ws: Socket, text: str) -> None:
        first, ws.first_frame = ws.first_frame, False
        try:
            message = json.loads(text)
        except ValueError:
            return
        if first and message.get("type") == "feature_flags":
            ws.feature_flags = bool((message.get("data") or {}).get("supports_preview_metadata"))
            ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True,
                                                             "max_upload_size": 104857600}})

    def _to_client(self, client_id: str | None, message: dict[str, Any]) -> None:
        """Per-prompt events: only to the socket(s) whose sid is the prompt's client_id."""
        for ws in [s for s in self.sockets if client_id and s.sid == client_id]:
            ws.send_json(message)

    def _broadcast(self, message: dict[str, Any]) -> None:
        for ws in list(self.sockets):
            ws.send_json(message)

    def _status(self) -> None:
        self._broadcast({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": self._remaining()}}}})

    def _remaining(self) -> int:
        return len(self.pending) + (1 if self.running else 0)

    def drop_sockets(self, client_id: str) -> None:
        for ws in [s for s in self.sockets if s.sid == client_id]:
            ws.drop()

    # -- execution ----------------------------------------------------------------------------------------
    def _executor(self) -> None:
        while True:
            with self.lock:
                while not self.pending and not self.closed:
                    self.lock.wait()
                if self.closed:
                    return
                item = self.running = self.pending.pop(0)
                self.interrupt_flag = False
            self._status()
            try:
                self._execute(item)
            finally:
                with self.lock:
                    self.running = None
                self._status()
                self._to_client(item["client_id"], {"type": "executing",
                                                    "data": {"node": None, "prompt_id": item["prompt_id"]}})

    def _order(self, prompt: dict[str, Any]) -> list[str]:
        done: list[str] = []

        def visit(node_id: str) -> None:
            if node_id in done:
                return
            for value in prompt[node_id].get("inputs", {}).values():
                if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                    visit(str(value[0]))
            done.append(node_id)

        for node_id in prompt:
            visit(node_id)
        return done

    def _execute(self, item: dict[str, Any]) -> None:
        prompt, pid, cid = item["prompt"], item["prompt_id"], item["client_id"]
        ts = lambda: int(time.time() * 1000)
        messages: list[list[Any]] = []

        def event(kind: str, data: dict[str, Any], record: bool = False, broadcast: bool = False) -> None:
            if record:
                messages.append([kind, data])
            message = {"type": kind, "data": data}
            if broadcast or (not cid and kind in ("progress", "progress_state")):
                self._broadcast(message)
            elif cid:
                self._to_client(cid, message)

        signatures: dict[str, str] = {}
        for node_id in self._order(prompt):
            node = prompt[node_id]
            upstream = [signatures[str(v[0])] for v in node.get("inputs", {}).values()
                        if isinstance(v, list) and len(v) == 2 and str(v[0]) in signatures]
            signatures[node_id] = hashlib.sha1(json.dumps([node, upstream], sort_keys=True).encode()).hexdigest()
        cached = [n for n in self._order(prompt) if signatures[n] in self.cache]
        event("execution_start", {"prompt_id": pid, "timestamp": ts()}, record=True)
        event("execution_cached", {"nodes": cached, "prompt_id": pid, "timestamp": ts()}, record=True)
        outputs: dict[str, Any] = {}
        executed: list[str] = []
        states: dict[str, Any] = {}

        def progress_state() -> None:
            event("progress_state", {"prompt_id": pid, "nodes": dict(states)})

        for node_id in self._order(prompt):
            node = prompt[node_id]
            kind, inputs = node["class_type"], node.get("inputs", {})
            if node_id in cached:
                if kind in OUTPUT_NODES:
                    outputs[node_id] = self.cache[signatures[node_id]]
                    event("executed", {"node": node_id, "display_node": node_id, "output": outputs[node_id],
                                       "prompt_id": pid})
                continue
            states[node_id] = {"value": 0.0, "max": 1.0, "state": "running", "node_id": node_id, "prompt_id": pid,
                               "display_node_id": node_id, "parent_node_id": None, "real_node_id": node_id}
            progress_state()
            with self.lock:
                item["node"] = node_id
            event("executing", {"node": node_id, "display_node": node_id, "prompt_id": pid})
            failure = self._run_node(node_id, kind, inputs, pid, cid, event, progress_state, states, item)
            if failure == "interrupted":
                event("execution_interrupted", {"prompt_id": pid, "node_id": node_id, "node_type": kind,
                                                "executed": executed, "timestamp": ts()}, record=True,
                      broadcast=not cid)
                self._finish(item, "error", False, {}, messages)
                return
            if failure:
                event("execution_error", {"prompt_id": pid, "node_id": node_id, "node_type": kind,
                                          "executed": executed, "exception_message": failure + "\n",
                                          "exception_type": "RuntimeError",
                                          "traceback": ["  File \"execution.py\", line 496, in execute\n"],
                                          "current_inputs": {k: [repr(v)] for k, v in inputs.items()},
                                          "current_outputs": executed, "timestamp": ts()}, record=True)
                self._finish(item, "error", True, {}, messages)
                return
            if kind in OUTPUT_NODES:
                number = next(self.counter)
                name = f"{inputs.get('filename_prefix', 'ComfyUI')}_{number:05}_.png"
                self.files[(OUTPUT_NODES[kind], "", name)] = PNG + node_id.encode() + str(number).encode()
                outputs[node_id] = {"images": [{"filename": name, "subfolder": "", "type": OUTPUT_NODES[kind]}]}
                event("executed", {"node": node_id, "display_node": node_id, "output": outputs[node_id],
                                   "prompt_id": pid})
            self.cache[signatures[node_id]] = outputs.get(node_id)
            executed.append(node_id)
            states[node_id] = {**states[node_id], "value": 1.0, "state": "finished"}
            progress_state()
        event("execution_success", {"prompt_id": pid, "timestamp": ts()}, record=True)
        self._finish(item, "success", True, outputs, messages)

    def _run_node(self, node_id: str, kind: str, inputs: dict[str, Any], pid: str, cid: str | None, event: Any,
                  progress_state: Any, states: dict[str, Any], item: dict[str, Any]) -> str:
        """Returns "" on success, "interrupted", or an error message."""
        if self.interrupt_flag:
            return "interrupted"
        if kind != "WorkerTestSleepProgress":
            return ""
        steps, step_s = int(inputs["steps"]), float(inputs.get("step_s", 0.05))
        fail_at, drop_at = int(inputs.get("fail_at_step", 0)), int(inputs.get("drop_socket_at_step", 0))
        for step in range(1, steps + 1):
            time.sleep(step_s)
            if self.interrupt_flag:
                return "interrupted"
            if fail_at and step == fail_at:
                return f"WorkerTestSleepProgress: deliberate failure at step {step} of {steps}"
            if drop_at and step == drop_at and cid:
                self.drop_sockets(cid)
            states[node_id] = {**states[node_id], "value": step, "max": steps}
            progress_state()
            if inputs.get("send_preview"):
                for ws in [s for s in self.sockets if s.sid == cid]:
                    if ws.feature_flags:
                        meta = json.dumps({"node_id": node_id, "prompt_id": pid, "display_node_id": node_id,
                                           "parent_node_id": None, "real_node_id": node_id,
                                           "image_type": "image/jpeg"}).encode()
                        ws.send_bytes(struct.pack(">II", 4, len(meta)) + meta + preview_image(step))
            event("progress", {"value": step, "max": steps, "prompt_id": pid, "node": node_id})
            if inputs.get("send_preview"):
                for ws in [s for s in self.sockets if s.sid == cid and not s.feature_flags]:
                    ws.send_bytes(struct.pack(">II", 1, 1) + preview_image(step))
        return ""

    def _finish(self, item: dict[str, Any], status: str, completed: bool, outputs: dict[str, Any],
                messages: list[list[Any]]) -> None:
        with self.lock:
            self.history[item["prompt_id"]] = {
                "prompt": self._queue_item(item), "outputs": outputs,
                "status": {"status_str": status, "completed": completed, "messages": messages},
                "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                         for n in outputs}}


def preview_image(step: int) -> bytes:
    """The preview the test node sends at `step` (JPEG magic, then the step, so tests tell frames apart)."""
    return b"\xff\xd8jpeg-step-%d" % step


def main(argv: list[str] | None = None) -> None:
    """Run the double as a server for trying the appliance's ComfyUI connector by hand (no GPU, no models)."""
    import argparse

    parser = argparse.ArgumentParser(description="A protocol-faithful stand-in for ComfyUI on 127.0.0.1, for "
                                     "trying WORKER_CONNECTORS=comfyui without ComfyUI. Ctrl-C stops it.")
    parser.add_argument("--port", type=int, default=8188, help="port to listen on (default 8188; 0: any free)")
    args = parser.parse_args(argv)
    double = ComfyDouble(port=args.port).start()
    print(f"ComfyUI double listening at {double.url} (set WORKER_COMFYUI_PORT={double.port})", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        double.stop()


if __name__ == "__main__":
    main()
