"""Logging set-up shared by the entry points: one line per event, to stderr (supervisord keeps the files)."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s",
    )
