"""GET /docs: the OpenAPI document as one plain HTML page, rendered here (no script, nothing fetched)."""

from __future__ import annotations

from html import escape
from typing import Any

import falcon

from appliance.api.openapi import document

STYLE = ("body{font:15px/1.45 system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:.4em 0 1em}td,th{border:1px solid #ccc;padding:.2em .5em;"
         "text-align:left;vertical-align:top}code{background:#f3f3f3}h3{margin-top:2em}"
         ".m{font-weight:bold;text-transform:uppercase}")


def schema_text(schema: dict[str, Any]) -> str:
    """A schema in a few words: its type (or the schema it refers to) and its bounds."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return f'<a href="#schema-{name}">{name}</a>'
    for combo in ("anyOf", "oneOf"):
        if combo in schema:
            return " or ".join(schema_text(part) for part in schema[combo])
    if "const" in schema:
        return f"<code>{escape(repr(schema['const']))}</code>"
    if "enum" in schema:
        return "one of " + ", ".join(f"<code>{escape(str(v))}</code>" for v in schema["enum"])
    kind = schema.get("type", "any")
    words = [" or ".join(kind) if isinstance(kind, list) else str(kind)]
    if "items" in schema:
        words.append(f"of {schema_text(schema['items'])}")
    for key, label in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("minLength", "length ≥"),
                       ("maxLength", "length ≤"), ("maxProperties", "keys ≤"), ("default", "default")):
        if key in schema:
            words.append(f"{label} {escape(str(schema[key]))}")
    if "pattern" in schema:
        words.append(f"matching <code>{escape(schema['pattern'])}</code>")
    if "format" in schema:
        words.append(f"({escape(schema['format'])})")
    return " ".join(words)


def fields_table(schema: dict[str, Any]) -> str:
    required = set(schema.get("required", []))
    rows = [f"<tr><td><code>{escape(name)}</code>{' (required)' if name in required else ''}</td>"
            f"<td>{schema_text(prop)}</td><td>{escape(prop.get('description', ''))}</td></tr>"
            for name, prop in schema.get("properties", {}).items()]
    for pattern, prop in schema.get("patternProperties", {}).items():
        rows.append(f"<tr><td>keys matching <code>{escape(pattern)}</code></td><td>{schema_text(prop)}</td>"
                    f"<td>{escape(prop.get('description', ''))}</td></tr>")
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        rows.append(f"<tr><td>any other field</td><td>{schema_text(extra)}</td><td></td></tr>")
    if not rows:
        return ""
    return "<table><tr><th>field</th><th>type</th><th>meaning</th></tr>" + "".join(rows) + "</table>"


def _operation(path: str, method: str, op: dict[str, Any], shared: list[dict[str, Any]]) -> str:
    out = [f'<h3 id="{escape(op.get("operationId", ""))}"><span class="m">{method}</span> '
           f"<code>{escape(path)}</code></h3><p>{escape(op.get('summary', ''))}</p>"]
    if op.get("description"):
        out.append(f"<p>{escape(op['description'])}</p>")
    out.append("<p>" + ("Needs an API key." if op.get("security") else "Open: no key needed.") + "</p>")
    params = shared + op.get("parameters", [])
    if params:
        out.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>meaning</th></tr>")
        out.extend(f"<tr><td><code>{escape(p['name'])}</code>{' (required)' if p.get('required') else ''}</td>"
                   f"<td>{p['in']}</td><td>{schema_text(p['schema'])}</td><td>{escape(p.get('description', ''))}"
                   "</td></tr>" for p in params)
        out.append("</table>")
    body = op.get("requestBody")
    if body:
        for media, content in body["content"].items():
            out.append(f"<p>Body (<code>{escape(media)}</code>): {schema_text(content['schema'])}</p>")
    out.append("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>")
    for status, answer in op["responses"].items():
        bodies = ", ".join(f"<code>{escape(media)}</code> {schema_text(c['schema'])}"
                           for media, c in answer.get("content", {}).items())
        out.append(f"<tr><td>{status}</td><td>{escape(answer['description'])}</td><td>{bodies}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _websocket(ws: dict[str, Any]) -> str:
    out = ['<h2 id="websocket">WebSocket</h2>', f"<p>{escape(ws['description'])}</p>"]
    for path, socket in ws["sockets"].items():
        out.append(f"<h3><code>{escape(path)}</code></h3><p>{escape(socket['summary'])}. On open: "
                   f"<code>{escape(socket['on_open'])}</code>.</p>")
        out.append("<table><tr><th>message <code>type</code></th><th>fields</th><th>answered with</th></tr>")
        for kind, message in socket["messages"].items():
            fields = "<br>".join(f"<code>{escape(name)}</code>: {escape(what)}"
                                 for name, what in message["fields"].items())
            if message.get("note"):
                fields += f"<br>{escape(message['note'])}"
            replies = ", ".join(f"<code>{escape(r)}</code>" for r in message["replies"])
            out.append(f"<tr><td><code>{escape(kind)}</code></td><td>{fields}</td><td>{replies}</td></tr>")
        out.append("</table>")
    return "".join(out)


def render(doc: dict[str, Any]) -> str:
    """The whole page: operations, security, WebSocket messages, then every schema."""
    info = doc["info"]
    out = ["<!doctype html><html><head><meta charset=\"utf-8\">", f"<title>{escape(info['title'])}</title>",
           f"<style>{STYLE}</style></head><body>", f"<h1>{escape(info['title'])}</h1>",
           f"<p>{escape(info['description'])}</p>",
           '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI '
           f"{escape(doc['openapi'])}). Sections: <a href=\"#http\">HTTP</a>, "
           '<a href="#security">API keys</a>, <a href="#websocket">WebSocket</a>, <a href="#schemas">schemas</a>.'
           "</p>", '<h2 id="http">HTTP</h2>']
    for path, item in doc["paths"].items():
        shared = item.get("parameters", [])
        out.extend(_operation(path, method, op, shared) for method, op in item.items() if method != "parameters")
    out.append('<h2 id="security">API keys</h2><p>With API_KEYS set, every operation not marked open needs a '
               "key, in any of these forms:</p><ul>")
    for name, scheme in doc["components"]["securitySchemes"].items():
        where = ("<code>Authorization: Bearer &lt;key&gt;</code>" if scheme["type"] == "http"
                 else f"{scheme['in']} <code>{escape(scheme['name'])}</code>")
        out.append(f"<li>{where} ({escape(name)})</li>")
    out.append("</ul>")
    out.append(_websocket(doc["x-websocket"]))
    out.append('<h2 id="schemas">Schemas</h2>')
    for name, schema in doc["components"]["schemas"].items():
        out.append(f'<h3 id="schema-{name}">{name}</h3>')
        if schema.get("description"):
            out.append(f"<p>{escape(schema['description'])}</p>")
        if "anyOf" in schema and "properties" in schema:
            out.append("<p>Needs one of: " + ", ".join(f"<code>{r['required'][0]}</code>" for r in schema["anyOf"])
                       + ".</p>")
        for rule in schema.get("allOf", []):
            service = rule["if"]["properties"]["service_required"]["const"]
            out.append(f"<p>When service_required is <code>{escape(service)}</code>, payload is "
                       f"{schema_text(rule['then']['properties']['payload'])}.</p>")
        out.append(fields_table(schema) or f"<p>{schema_text(schema)}</p>")
    out.append("</body></html>")
    return "\n".join(out)


class DocsPage:
    """GET /docs."""

    def __init__(self, keys: bool = False):
        self.body = render(document(keys)).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.data = self.body
