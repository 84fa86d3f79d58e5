"""What a ComfyUI job's payload holds, checked at submit (used by connectors/comfyui.py).

`workflow` (or `prompt`): ComfyUI's API-format graph, a non-empty object of nodes {node id: {class_type,
inputs}}. A UI-format workflow (what File → Save writes: `nodes`, `links`, `last_node_id`) is named as such,
since ComfyUI itself answers it with a 500. `images` (optional): {file name: base64 bytes}, uploaded to ComfyUI's
input folder before the prompt is posted, so that `LoadImage` nodes can name them.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from appliance.errors import ValidationError

MAX_IMAGES = 16
MAX_IMAGE_BASE64_CHARS = 16 * 1024 * 1024  # per image, as sent (about 12 MiB of image); API_MAX_PAYLOAD_BYTES binds too
IMAGE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
UI_FORMAT = ("this is a UI-format workflow (File → Save); export it with 'Save (API Format)' (in the workflow "
             "menu; older versions: enable the dev mode options in the settings)")
_IMAGE_NAME_RE = re.compile(IMAGE_NAME)
_BASE64_RE = re.compile(BASE64)


def graph_field(payload: dict[str, Any]) -> str:
    """Which key holds the graph: `workflow`, or `prompt` (ComfyUI's own name) when only that is given."""
    return "prompt" if payload.get("workflow") is None and "prompt" in payload else "workflow"


def check(payload: dict[str, Any]) -> None:
    """Refuse a payload ComfyUI could not run.

    Raises:
        ValidationError: naming `payload.<field>` and what is expected.
    """
    name = graph_field(payload)
    check_graph(payload.get(name), f"payload.{name}")
    if name == "workflow" and payload.get("prompt") is not None:
        check_graph(payload["prompt"], "payload.prompt")
    images_of(payload)


def check_graph(graph: Any, field: str) -> None:
    expected = "a ComfyUI API-format workflow: an object of nodes {node id: {class_type, inputs}}"
    if graph is None:
        raise ValidationError(field, f"required: {expected}")
    if not isinstance(graph, dict):
        raise ValidationError(field, f"expected {expected}, got {type(graph).__name__}")
    if "nodes" in graph and isinstance(graph.get("nodes"), list) or "last_node_id" in graph:
        raise ValidationError(field, UI_FORMAT)
    if not graph:
        raise ValidationError(field, f"expected {expected}, got an empty object")
    for node_id, node in graph.items():
        where = f"{field}.{node_id}"
        if not isinstance(node, dict):
            raise ValidationError(where, f"expected a node {{class_type, inputs}}, got {type(node).__name__}")
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            raise ValidationError(f"{where}.class_type", "required: the node's type, e.g. \"KSampler\"")
        if not isinstance(node.get("inputs"), dict):
            raise ValidationError(f"{where}.inputs", "required: an object of the node's inputs")


def images_of(payload: dict[str, Any]) -> dict[str, bytes]:
    """The payload's input images, decoded.

    Raises:
        ValidationError: naming `payload.images[.<name>]`.
    """
    images = payload.get("images")
    if images is None:
        return {}
    if not isinstance(images, dict):
        raise ValidationError("payload.images", "expected an object {file name: base64 data}")
    if len(images) > MAX_IMAGES:
        raise ValidationError("payload.images", f"at most {MAX_IMAGES} images")
    decoded = {}
    for name, data in images.items():
        if not _IMAGE_NAME_RE.fullmatch(name):
            raise ValidationError("payload.images", f"image name {name!r}: expected letters, digits, '.', '_' or "
                                                    "'-' (at most 128, no folders)")
        where = f"payload.images.{name}"
        if not isinstance(data, str) or len(data) > MAX_IMAGE_BASE64_CHARS or not _BASE64_RE.fullmatch(data):
            raise ValidationError(where, f"expected the image's bytes in base64 (at most {MAX_IMAGE_BASE64_CHARS} "
                                         "characters)")
        try:
            decoded[name] = base64.b64decode(data, validate=True)
        except binascii.Error as exc:
            raise ValidationError(where, f"not base64: {exc}") from None
    return decoded


def schema() -> dict[str, Any]:
    """The JSON Schema `check` enforces."""
    node = {"type": "object", "required": ["class_type", "inputs"],
            "properties": {"class_type": {"type": "string", "minLength": 1}, "inputs": {"type": "object"}}}
    graph = {"type": "object", "minProperties": 1, "additionalProperties": node,
             "description": "ComfyUI's API-format graph (Save (API Format)): {node id: {class_type, inputs}}"}
    return {
        "type": "object",
        "properties": {
            "workflow": graph,
            "prompt": {**graph, "description": "the same as `workflow` (ComfyUI's own name), used without it"},
            "images": {"type": "object", "maxProperties": MAX_IMAGES, "propertyNames": {"pattern": IMAGE_NAME},
                       "additionalProperties": {"type": "string", "maxLength": MAX_IMAGE_BASE64_CHARS,
                                                "pattern": BASE64, "contentEncoding": "base64"},
                       "description": "input images by file name, uploaded to ComfyUI's input folder; a LoadImage "
                                      "node names one by its file name"},
        },
        "anyOf": [{"required": ["workflow"], "properties": {"workflow": {"type": "object"}}},
                  {"required": ["prompt"], "properties": {"prompt": {"type": "object"}}}],
    }
