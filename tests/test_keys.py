"""Pins every key and channel name in appliance/keys.py, with and without a prefix.

The names are a contract with the guide's `redis-cli` checks and with existing clients: a change here must be
deliberate, so each exact string is spelled out.
"""

from __future__ import annotations

import inspect

import pytest

from appliance.keys import Keys

EXPECTED = {
    "job": ("job:abc", ("abc",)),
    "job_prefix": ("job:", None),
    "progress": ("progress:abc", ("abc",)),
    "progress_prefix": ("progress:", None),
    "pending": ("jobs:pending", None),
    "pending_service": ("jobs:pending:simulation", ("simulation",)),
    "pending_service_prefix": ("jobs:pending:", None),
    "delayed": ("jobs:delayed", None),
    "leases": ("jobs:leases", None),
    "lease_clock": ("jobs:lease-clock", None),
    "seq": ("jobs:seq", None),
    "index_all": ("jobs:index:all", None),
    "index_status": ("jobs:index:status:completed", ("completed",)),
    "index_status_prefix": ("jobs:index:status:", None),
    "index_service": ("jobs:index:service:simulation", ("simulation",)),
    "index_service_prefix": ("jobs:index:service:", None),
    "index_submitter": ("jobs:index:submitted_by:alice", ("alice",)),
    "index_submitter_prefix": ("jobs:index:submitted_by:", None),
    "expiry": ("jobs:expiry", None),
    "services": ("jobs:services", None),
    "cancels": ("jobs:cancel", None),
    "scratch": ("jobs:scratch:tok", ("tok",)),
    "stats": ("jobs:stats", None),
    "wake": ("jobs:wake:simulation", ("simulation",)),
    "wake_prefix": ("jobs:wake:", None),
    "worker": ("worker:worker1-direct", ("worker1-direct",)),
    "worker_prefix": ("worker:", None),
    "worker_heartbeat": ("worker:worker1-direct:heartbeat", ("worker1-direct",)),
    "worker_jobs": ("worker:worker1-direct:jobs", ("worker1-direct",)),
    "workers_active": ("workers:active", None),
    "events": ("events", None),
    "pending_class": ("jobs:pending:comfyui:req:ab12", ("comfyui", "ab12")),
    "requirement_class": ("jobs:class:ab12", ("ab12",)),
    "requirement_class_prefix": ("jobs:class:", None),
    "requirement_classes": ("jobs:classes:comfyui", ("comfyui",)),
    "requirement_classes_prefix": ("jobs:classes:", None),
    "classes_version": ("jobs:class-version", None),
    "classes_used": ("jobs:class-used", None),
    "unworkable_class": ("jobs:unworkable:ab12", ("ab12",)),
    "unworkable_prefix": ("jobs:unworkable:", None),
    "unoffered": ("jobs:unoffered:comfyui", ("comfyui",)),
    "unoffered_prefix": ("jobs:unoffered:", None),
    "services_offered": ("workers:offered", None),
    "services_serving": ("workers:serving", None),
    "services_unhealthy": ("workers:unhealthy", None),
    "job_outputs": ("outputs:abc", ("abc",)),
    "job_preview": ("preview:abc", ("abc",)),
    "fanout_wake": ("api:host:1:wake", ("host:1",)),
    "wake_worker": ("jobs:wake-worker:w1", ("w1",)),
    "wake_worker_prefix": ("jobs:wake-worker:", None),
    "idle_workers": ("workers:idle:comfyui", ("comfyui",)),
    "idle_workers_prefix": ("workers:idle:", None),
    "api_connections": ("api:connections", None),
}


def _value(keys: Keys, name: str, args: tuple[str, ...] | None) -> str:
    attr = getattr(keys, name)
    return attr(*args) if args is not None else attr


def _public_names() -> set[str]:
    return {name for name, _ in inspect.getmembers(Keys)
            if not name.startswith("_") and name != "prefix" and not name.isupper()}


def test_suffix_constants() -> None:
    """Suffixes Lua appends to worker:{id} (passed through ARGV) spell the same names as the builders."""
    constants = {name: value for name, value in inspect.getmembers(Keys) if name.isupper()}
    assert constants == {"WORKER_JOBS_SUFFIX": ":jobs", "WORKER_HEARTBEAT_SUFFIX": ":heartbeat"}
    for k in (Keys(), Keys("p:")):
        assert k.worker("w") + Keys.WORKER_JOBS_SUFFIX == k.worker_jobs("w")
        assert k.worker("w") + Keys.WORKER_HEARTBEAT_SUFFIX == k.worker_heartbeat("w")


def test_every_name_is_pinned() -> None:
    """A key added to keys.py must be added here too (and so be reviewed as a contract)."""
    assert _public_names() == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_name_without_prefix(name: str) -> None:
    expected, args = EXPECTED[name]
    assert _value(Keys(), name, args) == expected


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_name_with_prefix(name: str) -> None:
    expected, args = EXPECTED[name]
    assert _value(Keys("app1:"), name, args) == "app1:" + expected


def test_guide_names_unchanged() -> None:
    """The names the guide's redis-cli commands use, spelled as the guide spells them."""
    k = Keys()
    assert k.pending == "jobs:pending"
    assert k.workers_active == "workers:active"
    assert k.worker_heartbeat("worker1") == "worker:worker1:heartbeat"
    assert k.worker("worker1") == "worker:worker1"
    assert k.job("j1") == "job:j1"
    assert k.progress("j1") == "progress:j1"


def test_prefixes_agree_with_builders() -> None:
    """Lua builds run-time keys from the prefixes; they must match what the builders spell."""
    for k in (Keys(), Keys("p:")):
        assert k.job_prefix + "x" == k.job("x")
        assert k.progress_prefix + "x" == k.progress("x")
        assert k.pending_service_prefix + "s" == k.pending_service("s")
        assert k.index_status_prefix + "pending" == k.index_status("pending")
        assert k.index_service_prefix + "s" == k.index_service("s")
        assert k.wake_prefix + "s" == k.wake("s")
        assert k.worker_prefix + "w" == k.worker("w")
