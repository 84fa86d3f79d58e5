"""Every Redis key and channel name the appliance uses, in one place.

The names are the original system's (`job:{id}`, `jobs:pending`, `worker:{id}`, ...) so that the guide's
`redis-cli` checks keep working. An optional prefix namespaces all of them. Lua scripts receive whole keys
through KEYS, or, where a script only learns an id at run time (the job it claims), one of the prefixes
below through ARGV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Keys:
    """Builds key names under an optional prefix."""

    prefix: str = ""

    WORKER_JOBS_SUFFIX: ClassVar[str] = ":jobs"
    WORKER_HEARTBEAT_SUFFIX: ClassVar[str] = ":heartbeat"

    # -- jobs ---------------------------------------------------------------------------------------
    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    @property
    def job_prefix(self) -> str:
        return f"{self.prefix}job:"

    def progress(self, job_id: str) -> str:
        return f"{self.prefix}progress:{job_id}"

    @property
    def progress_prefix(self) -> str:
        return f"{self.prefix}progress:"

    @property
    def pending(self) -> str:
        """All pending jobs; higher score first, FIFO among equal priorities (read with ZREVRANGE)."""
        return f"{self.prefix}jobs:pending"

    def pending_service(self, service: str) -> str:
        """Pending jobs of one service, same scores as `pending`: what a claim reads."""
        return f"{self.prefix}jobs:pending:{service}"

    @property
    def pending_service_prefix(self) -> str:
        return f"{self.prefix}jobs:pending:"

    @property
    def delayed(self) -> str:
        """Jobs waiting to be retried; score = when they are due (epoch ms)."""
        return f"{self.prefix}jobs:delayed"

    @property
    def leases(self) -> str:
        """Jobs held by a worker; score = when the holder's lease runs out (epoch ms)."""
        return f"{self.prefix}jobs:leases"

    @property
    def lease_clock(self) -> str:
        """Redis's own time (epoch ms) when a script last judged or renewed leases: a longer silence means Redis
        was away, and leases are moved on by it (appliance/lua/_lib.lua `present`)."""
        return f"{self.prefix}jobs:lease-clock"

    @property
    def seq(self) -> str:
        """Counter giving every submitted job its place in line."""
        return f"{self.prefix}jobs:seq"

    @property
    def index_all(self) -> str:
        """Every known job; score = its sequence number (newest first with ZREVRANGE)."""
        return f"{self.prefix}jobs:index:all"

    def index_status(self, status: str) -> str:
        return f"{self.prefix}jobs:index:status:{status}"

    @property
    def index_status_prefix(self) -> str:
        return f"{self.prefix}jobs:index:status:"

    def index_service(self, service: str) -> str:
        return f"{self.prefix}jobs:index:service:{service}"

    @property
    def index_service_prefix(self) -> str:
        return f"{self.prefix}jobs:index:service:"

    def index_submitter(self, name: str) -> str:
        """Jobs submitted with one API key (by its name), for listings that key may see; members only count
        while they are in `index_all` too (listings intersect the two, which also drops expired members)."""
        return f"{self.prefix}jobs:index:submitted_by:{name}"

    @property
    def index_submitter_prefix(self) -> str:
        return f"{self.prefix}jobs:index:submitted_by:"

    @property
    def expiry(self) -> str:
        """Finished jobs; score = when their record expires (epoch ms), to prune the indexes."""
        return f"{self.prefix}jobs:expiry"

    @property
    def services(self) -> str:
        """Set of every service a job was ever submitted for."""
        return f"{self.prefix}jobs:services"

    @property
    def cancels(self) -> str:
        """Pub/sub channel telling workers to stop a running job ({"job_id", "worker_id"} JSON)."""
        return f"{self.prefix}jobs:cancel"

    def scratch(self, token: str) -> str:
        """A short-lived key for one listing query (intersections of two indexes)."""
        return f"{self.prefix}jobs:scratch:{token}"

    @property
    def stats(self) -> str:
        """Counters over the appliance's life (submitted, completed, failed, ...)."""
        return f"{self.prefix}jobs:stats"

    def wake(self, service: str) -> str:
        """Pub/sub channel that wakes idle workers serving `service` when a job arrives."""
        return f"{self.prefix}jobs:wake:{service}"

    @property
    def wake_prefix(self) -> str:
        return f"{self.prefix}jobs:wake:"

    def wake_worker(self, worker_id: str) -> str:
        """Pub/sub channel that wakes one idle worker (picked from `idle_workers`) when a job arrives."""
        return f"{self.prefix}jobs:wake-worker:{worker_id}"

    @property
    def wake_worker_prefix(self) -> str:
        return f"{self.prefix}jobs:wake-worker:"

    def idle_workers(self, service: str) -> str:
        """Set of the workers whose last claim emptied `service`'s queue and that have free slots: a job
        arriving in that queue wakes one of them (appliance/lua/_lib.lua `wake`)."""
        return f"{self.prefix}workers:idle:{service}"

    @property
    def idle_workers_prefix(self) -> str:
        return f"{self.prefix}workers:idle:"

    # -- requirement classes (appliance/matching.py) --------------------------------------------------
    def pending_class(self, service: str, class_id: str) -> str:
        """Claim queue of one requirement class (jobs of `service` with the same requirements)."""
        return f"{self.prefix}jobs:pending:{service}:req:{class_id}"

    def requirement_class(self, class_id: str) -> str:
        """String: JSON of a requirement class (service, requirements, customer_id, queue)."""
        return f"{self.prefix}jobs:class:{class_id}"

    @property
    def requirement_class_prefix(self) -> str:
        return f"{self.prefix}jobs:class:"

    def requirement_classes(self, service: str) -> str:
        """Set of the ids of a service's requirement classes (those submitted to lately)."""
        return f"{self.prefix}jobs:classes:{service}"

    @property
    def requirement_classes_prefix(self) -> str:
        return f"{self.prefix}jobs:classes:"

    @property
    def classes_version(self) -> str:
        """Counter bumped whenever a requirement class appears or is forgotten (workers plan their claim queues
        again). Not under jobs:classes:, where a service could be named "version"."""
        return f"{self.prefix}jobs:class-version"

    @property
    def classes_used(self) -> str:
        """Zset: requirement class id → when a job was last submitted to it (epoch ms); idle classes whose
        queues are empty are forgotten (appliance/classes.py CLASS_IDLE_S)."""
        return f"{self.prefix}jobs:class-used"

    @property
    def unworkable_prefix(self) -> str:
        return f"{self.prefix}jobs:unworkable:"

    def unworkable_class(self, class_id: str) -> str:
        """Jobs of a class that no registered worker can serve; same scores as the claim queues."""
        return f"{self.prefix}jobs:unworkable:{class_id}"

    # -- services offered by workers (appliance/classes.py) ------------------------------------------
    def unoffered(self, service: str) -> str:
        """Jobs of a service no registered worker offered lately (status `unworkable`); same scores as the
        claim queues, to put them back in line where they were."""
        return f"{self.prefix}jobs:unoffered:{service}"

    @property
    def unoffered_prefix(self) -> str:
        return f"{self.prefix}jobs:unoffered:"

    @property
    def services_offered(self) -> str:
        """Zset: service → when a registered worker last had it configured (epoch ms; its register and
        heartbeats), healthy or not. Offered within OFFERED_WINDOW_MS (appliance/scripts.py), its jobs wait
        in line; otherwise they are `unworkable`."""
        return f"{self.prefix}workers:offered"

    @property
    def services_serving(self) -> str:
        """Zset: service → when a registered worker last offered it healthy (epoch ms)."""
        return f"{self.prefix}workers:serving"

    @property
    def services_unhealthy(self) -> str:
        """Hash: service → why its jobs wait (configured on a worker whose health check fails, none healthy)."""
        return f"{self.prefix}workers:unhealthy"

    def job_outputs(self, job_id: str) -> str:
        """Hash: file name → JSON {content_type, size, node, data (base64)} of a job's output files."""
        return f"{self.prefix}outputs:{job_id}"

    def job_preview(self, job_id: str) -> str:
        """String: JSON {content_type, node, data (base64)} of a running job's latest preview image (short TTL)."""
        return f"{self.prefix}preview:{job_id}"

    # -- workers ------------------------------------------------------------------------------------
    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    @property
    def worker_prefix(self) -> str:
        return f"{self.prefix}worker:"

    def worker_heartbeat(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}{self.WORKER_HEARTBEAT_SUFFIX}"

    def worker_jobs(self, worker_id: str) -> str:
        """Set of the job ids a worker holds right now."""
        return f"{self.prefix}worker:{worker_id}{self.WORKER_JOBS_SUFFIX}"


    @property
    def workers_active(self) -> str:
        return f"{self.prefix}workers:active"

    # -- events ---------------------------------------------------------------------------------------
    @property
    def events(self) -> str:
        """Stream of appliance-wide events (job submitted/finished, workers joining/leaving) for monitors."""
        return f"{self.prefix}events"

    # -- API processes --------------------------------------------------------------------------------
    def fanout_wake(self, instance: str) -> str:
        """Tiny stream an API process writes to interrupt its own blocked XREAD when it follows a new stream."""
        return f"{self.prefix}api:{instance}:wake"

    @property
    def api_connections(self) -> str:
        """Hash: API process instance → JSON of its open SSE/WebSocket connections (for connection-stats)."""
        return f"{self.prefix}api:connections"
