"""Progress fan-out benchmark: N SSE (or WebSocket) subscribers on one host while jobs emit progress.

Figures (printed, never asserted): events delivered out of expected, latency from the event's write (the
progress message carries the writer's clock) to the client's receipt (p50/p95/p99), Redis connections open
while every subscriber is connected, and API memory per connection (RSS growth / subscribers).

    python -m loadtest.fanout_figures --subscribers 1000 --kind sse,ws    # own redis-server and gunicorn

`measure(queue, api_port, subscribers, kind)` works against any running API (bin/bench's private appliance).

The subscribers run in a child process under gevent (`--client`), so the producer's timing is not disturbed
by the clients and this module can be imported by unpatched code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HOME = Path(__file__).resolve().parent.parent
JOBS, STEPS = 10, 20
ROUND_S = 0.5            # each job emits one progress event per round: 20 events/s, like 10 simulations
SERVICE = "bench-fanout"
CLIENT_PROCS = 2         # subscriber processes (gevent); the clients cost more CPU than the server


# -- the client side (child process, gevent) ---------------------------------------------------------------
def client_main(args: argparse.Namespace) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import orjson
    import websocket

    jobs = args.jobs.split(",")
    latencies: list[float] = []
    counts = {"progress": 0, "done": 0, "errors": 0}
    connected = [0]

    def sse_client(job_id: str) -> None:
        import socket
        sock = socket.create_connection(("127.0.0.1", args.port), timeout=120)
        sock.sendall(f"GET /api/jobs/{job_id}/progress HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        reader = sock.makefile("rb")
        event = ""
        first = True
        for raw in reader:
            line = raw.rstrip(b"\r\n")
            if line.startswith(b"event: "):
                event = line[7:].decode()
                if first and event == "connected":
                    connected[0] += 1
                    first = False
            elif line.startswith(b"data: ") and event == "progress":
                data = orjson.loads(line[6:])
                latencies.append(time.time() - float(data["message"]))
                counts["progress"] += 1
            elif line.startswith(b"data: ") and event == "completed":
                counts["done"] += 1
                break
        sock.close()

    def ws_client(job_id: str) -> None:
        ws = websocket.create_connection(f"ws://127.0.0.1:{args.port}/", timeout=120,
                                         skip_utf8_validation=True)  # pure-Python validation: client-bound
        ws.recv()
        ws.send(orjson.dumps({"type": "subscribe_progress", "job_id": job_id}).decode())
        connected[0] += 1
        while True:
            message = orjson.loads(ws.recv())
            if message["type"] == "progress" and message.get("event") == "progress":
                latencies.append(time.time() - float(message["data"]["message"]))
                counts["progress"] += 1
            elif message["type"] == "complete_job":
                counts["done"] += 1
                break
        ws.close()

    def guarded(job_id: str) -> None:
        try:
            (sse_client if args.kind == "sse" else ws_client)(job_id)
        except Exception as exc:  # a benchmark counts failures instead of stopping
            counts["errors"] += 1
            print(f"client error: {exc!r}", file=sys.stderr)

    started = time.time()
    greenlets = []
    for i in range(args.subscribers):
        greenlets.append(gevent.spawn(guarded, jobs[i % len(jobs)]))
        if i % 100 == 99:
            gevent.sleep(0.01)
    while connected[0] + counts["errors"] < args.subscribers and time.time() - started < 120:
        gevent.sleep(0.05)
    print(json.dumps({"ready": connected[0], "connect_s": round(time.time() - started, 2)}), flush=True)
    gevent.joinall(greenlets, timeout=300)
    cpu = os.times()
    print(json.dumps({"latencies": latencies, **counts, "client_cpu_s": round(cpu.user + cpu.system, 2)}),
          flush=True)


# -- the producer side -------------------------------------------------------------------------------------
def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan")}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "max": ordered[-1] * 1000}


def api_processes(port: int) -> list[Any]:
    """The gunicorn worker processes listening on `port` (their parent listens too)."""
    import psutil

    listening = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "gunicorn" not in " ".join(proc.info["cmdline"] or []):
                continue
            if any(c.laddr.port == port and c.status == "LISTEN" for c in proc.net_connections("tcp")):
                listening.append(proc)
        except (psutil.Error, OSError):
            continue
    pids = {p.pid for p in listening}
    return [p for p in listening if p.ppid() in pids]


def rss(procs: list[Any]) -> int:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except Exception:
            pass
    return total


def cpu(procs: list[Any]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except Exception:
            pass
    return total


def measure(queue: Any, port: int, subscribers: int, kind: str, round_s: float = ROUND_S) -> dict[str, Any]:
    """Submit JOBS jobs, connect the subscribers, emit STEPS progress events per job, collect figures."""
    from appliance.jobs import JobSpec

    scripts, keys = queue.scripts, queue.keys
    worker = f"bench-fanout-{os.getpid()}"
    # it offers SERVICE (else the jobs are unworkable at submit), registered and gone at once: offered for a while
    scripts.register_worker(worker, 60, {}, {SERVICE: ""})
    scripts.deregister_worker(worker)
    job_ids = [queue.submit(JobSpec.parse({"service_required": SERVICE})) for _ in range(JOBS)]
    claimed = scripts.claim(worker, [keys.pending_service(SERVICE)], JOBS, 600_000)
    attempts = {job.id: job.attempt for job in claimed.jobs}
    procs = api_processes(port)
    rss_before = rss(procs)
    baseline_conns = len(queue.client.client_list())
    shares = [subscribers // CLIENT_PROCS + (1 if i < subscribers % CLIENT_PROCS else 0)
              for i in range(CLIENT_PROCS)]
    children = [subprocess.Popen([sys.executable, "-m", "loadtest.fanout_figures", "--client",
                                  "--port", str(port),
                                  "--kind", kind, "--subscribers", str(share), "--jobs", ",".join(job_ids)],
                                 cwd=HOME, stdout=subprocess.PIPE, text=True) for share in shares if share]
    readies = [json.loads(child.stdout.readline() or "{}") for child in children]  # type: ignore[union-attr]
    ready = {"ready": sum(r.get("ready", 0) for r in readies),
             "connect_s": max((r.get("connect_s", 0) for r in readies), default=0)}
    time.sleep(1.0)
    conns = len(queue.client.client_list())
    rss_after = rss(procs)
    cpu_before = cpu(procs)
    started = time.time()
    for step in range(1, STEPS + 1):
        for job_id in job_ids:
            scripts.progress(job_id, worker, attempts[job_id], step * 100 // STEPS, f"{time.time():.6f}",
                             step, STEPS)
        time.sleep(round_s)
    for job_id in job_ids:
        scripts.complete(job_id, worker, attempts[job_id], {"bench": True})
    emit_s = time.time() - started
    results = [json.loads(child.stdout.readline() or "{}") for child in children]  # type: ignore[union-attr]
    api_cpu_s = cpu(procs) - cpu_before
    for child in children:
        child.wait(60)
    result: dict[str, Any] = {"latencies": [x for r in results for x in r.get("latencies", [])]}
    for name in ("progress", "done", "errors", "client_cpu_s"):
        result[name] = round(sum(r.get(name, 0) for r in results), 2)
    return {
        "subscribers": subscribers, "events_per_s": round(JOBS / round_s, 1), "connected": ready.get("ready"),
        "connect_s": ready.get("connect_s"),
        "expected": subscribers * STEPS, "delivered": result.get("progress", 0),
        "completed": result.get("done", 0), "client_errors": result.get("errors", 0),
        "latency_ms": summary(result.get("latencies", [])), "emit_s": round(emit_s, 2),
        "redis_connections": conns, "redis_connections_before": baseline_conns,
        "api_processes": len(procs), "api_cpu_s": round(api_cpu_s, 2),
        "client_cpu_s": result.get("client_cpu_s"),
        "rss_per_connection_kb": round((rss_after - rss_before) / max(1, subscribers) / 1024, 1),
    }


def standalone(args: argparse.Namespace) -> None:
    """Own redis-server and gunicorn (API_PROCESSES=1) on free ports, then one measurement per kind."""
    from appliance.queue import Queue
    from appliance.redis_conn import connect
    from appliance.settings import QueueSettings
    from loadtest.private import free_port

    folder = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    redis_port, api_port = free_port(), free_port()
    redis_proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
                                   "--save", "", "--appendonly", "no", "--dir", str(folder)],
                                  stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{redis_port}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "REDIS", "HUB_"))}
    env.update(REDIS_URL=url, API_PORT=str(api_port), API_BIND="127.0.0.1", LOG_LEVEL="warning")
    api = subprocess.Popen([str(HOME / ".venv/bin/gunicorn"), "--config", "etc/gunicorn.conf.py",
                            "appliance.api.wsgi:app"], cwd=HOME, env=env)
    try:
        time.sleep(3)
        queue = Queue(connect(url), QueueSettings(redis_url=url))
        for kind in args.kind.split(","):
            figures = measure(queue, api_port, args.subscribers, kind, args.round_s)
            print(json.dumps({"kind": kind, **figures}), flush=True)
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(30)
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.fanout_figures", description=__doc__.splitlines()[0])
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--kind", default="sse,ws", help="sse, ws or both (comma-separated)")
    p.add_argument("--round-s", type=float, default=ROUND_S,
                   help=f"seconds between rounds of one progress event per job ({ROUND_S}; {JOBS} jobs)")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--jobs", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        client_main(args)
    else:
        standalone(args)


if __name__ == "__main__":
    main()
