"""The RQ half of the benchmark. Runs inside RQ's own virtual environment (var/bench/rq-venv), never .venv.

`python rq_side.py URL JOBS WORKERS LOGDIR [THREADS [LOG_LEVEL [ROUNDS]]]` starts WORKERS `rq worker -w
rq.SimpleWorker` processes on the Redis at URL, warms them up, enqueues JOBS no-op jobs one `enqueue` call each
from THREADS threads (as the appliance side submits), waits until all are finished (ROUNDS times), stops
the workers and prints one JSON line with the figures. It imports nothing from the appliance, so that RQ's
dependencies never meet ours.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def noop() -> dict[str, bool]:
    """The job: returns at once, like the appliance's `noop` connector."""
    return {"ok": True}


def main() -> int:
    from redis import Redis
    from rq import Queue, Worker
    from rq.registry import FinishedJobRegistry

    url, jobs, workers, logdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    threads = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    level = sys.argv[6].upper() if len(sys.argv) > 6 else "INFO"
    rounds = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    conn = Redis.from_url(url)
    conn.flushdb()
    queue = Queue("bench", connection=conn)
    finished = FinishedJobRegistry(queue=queue)
    rq_cli = Path(sys.executable).parent / "rq"
    here = str(Path(__file__).resolve().parent)
    procs = []
    for n in range(1, workers + 1):
        log = open(logdir / f"rq-worker{n}.log", "w")
        procs.append(subprocess.Popen(
            [str(rq_cli), "worker", "-w", "rq.worker.SimpleWorker", "-u", url, "-P", here, "-n", f"rq{n}",
             "--logging_level", level, "bench"], stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 60
        while Worker.count(connection=conn) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("RQ workers did not register within 60 s")
            time.sleep(0.1)

        def run(count: int) -> tuple[float, float]:
            base = finished.get_job_count(cleanup=False)
            started = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda share: [queue.enqueue("rq_side.noop") for _ in range(share)],
                              [count // threads + (1 if i < count % threads else 0) for i in range(threads)]))
            enqueued = time.perf_counter() - started
            deadline = time.monotonic() + 600
            while finished.get_job_count(cleanup=False) < base + count:
                if time.monotonic() > deadline:
                    raise RuntimeError("RQ did not finish the jobs within 600 s")
                time.sleep(0.002)
            return enqueued, time.perf_counter() - started

        run(min(200, jobs))  # warm-up: imports, connections
        measured = [run(jobs) for _ in range(rounds)]
        rates = sorted(jobs / total_s for _, total_s in measured)
        print(json.dumps({"jobs": jobs, "workers": workers, "rounds": [
            {"enqueue_s": e, "total_s": t, "jobs_per_s": jobs / t} for e, t in measured],
            "jobs_per_s": rates[-1], "median_jobs_per_s": rates[len(rates) // 2]}), flush=True)
        return 0
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
