"""The appliance: a Redis-backed job queue for GPU servers."""

__version__ = "0.1.0"
