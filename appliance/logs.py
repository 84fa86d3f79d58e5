"""Logging set-up shared by the entry points: one line per event, to stderr (supervisord keeps the files)."""

from __future__ import annotations

import logging
import sys


def log_format(program: str) -> str:
    """Every appliance log line: time, level, program, logger, message; e.g.
    `2025-01-02 03:04:05,678 INFO [worker worker1-direct] appliance.worker: claimed ...`."""
    return f"%(asctime)s %(levelname)s [{program}] %(name)s: %(message)s"


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=log_format(name))
