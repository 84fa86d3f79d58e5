"""Every JSON body and message of the API is written here, and writing never fails.

A value orjson cannot write (nested deeper than it allows, an integer beyond 64 bits, a string with lone
surrogates) is replaced by a marker instead of raising, so that one stored job or event no client can be sent
never stops a listing, a stream or a broadcast.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from appliance.jobs import ORJSON_MAX_DEPTH, unrenderable

log = logging.getLogger(__name__)

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def dumps(value: Any) -> bytes:
    """`value` as JSON; values that cannot be written are replaced by markers (logged), never an exception."""
    try:
        return orjson.dumps(value)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        log.warning("a message held a value that cannot be written as JSON (%s); it is sent with markers", exc)
        return orjson.dumps(sanitize(value, ORJSON_MAX_DEPTH - 1))


def dumps_text(value: Any) -> str:
    return dumps(value).decode()


def sanitize(value: Any, depth: int) -> Any:
    """A copy of `value` that orjson can write: containers past `depth` levels and unwritable leaves become
    markers."""
    if isinstance(value, dict):
        if depth <= 0:
            return unrenderable("nested too deep to be written")
        return {key if isinstance(key, str) else str(key): sanitize(item, depth - 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        if depth <= 0:
            return unrenderable("nested too deep to be written")
        return [sanitize(item, depth - 1) for item in value]
    if isinstance(value, str):
        try:
            value.encode()
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode()
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if _INT_MIN <= value <= _INT_MAX else str(value)
    return str(value)
