"""The OpenAPI 3.1 description of the bridge's HTTP interface, served at /openapi.json.

Built once at startup from the settings (limits, ack mode), so the document
states the limits this instance enforces. A test runs schemathesis against a
running bridge with it: every answer must match what is written here.
"""

from __future__ import annotations

from typing import Any

from bridge.auth import MAX_CREDENTIALS
from bridge.config import OPS_MAX_CONNECTIONS, Settings
from bridge.geins import ENTITY_ACTIONS, MAX_KEY_LENGTH
from bridge.httpprotocol import MAX_PIPELINED
from bridge.ingress import OPS_PORT_ONLY_NAMED, WEBHOOK_PATH

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_ANSWER = {"application/json": {"schema": {"$ref": "#/components/schemas/Answer"}}}
_ACK_HEADER = {"x-bridge-ack": {"$ref": "#/components/headers/x-bridge-ack"}}
_ACK_MODES = {"type": "string", "enum": ["durable", "broker", "memory"]}
# Spaces and tabs around a name are no part of it (geins._resolve_type_uncached).
_NAME = {"type": "string", "pattern": "^[ \t]*[A-Za-z0-9]{1,64}[ \t]*$"}


def _problem(description: str, *headers: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": _PROBLEM}},
    }
    if headers:
        response["headers"] = {h: {"$ref": f"#/components/headers/{h}"} for h in headers}
    return response


def _refusals_on_any_path(settings: Settings) -> dict[str, Any]:
    """What any request can be answered before it reaches its endpoint: the HTTP
    server's own refusals and the guards' size limits, which hold on every path."""
    return {
        "400": _problem(
            "Not valid HTTP/1.1, or cut short: the client shut down its side of the "
            "connection (half-close) before the whole request arrived."
        ),
        "408": _problem(
            f"The request (head and body) did not arrive within {settings.read_timeout:g} s "
            "of its first byte; the connection is closed."
        ),
        "414": _problem(f"URL over {settings.max_url_bytes} bytes."),
        "429": _problem(_sentence(_TOO_MANY_PIPELINED), "Retry-After"),
        "431": _problem(
            f"More than {settings.max_headers} headers, or over {settings.max_header_bytes} "
            "bytes of them; or a chunked body's chunk lines and trailer section, between "
            "two pieces of data, over the head's cap."
        ),
        "501": _problem(
            "A Transfer-Encoding with a coding besides chunked (gzip, say): send the body as it is."
        ),
        "503": _problem(_sentence(_too_many_connections(settings)), "Retry-After"),
    }


_TOO_MANY_PIPELINED = (
    f"more than {MAX_PIPELINED} requests sent ahead on one connection before their "
    "answers were read (too_many_pipelined); the connection is then closed."
)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _too_many_connections(settings: Settings) -> str:
    limits = f"{settings.connection_limit()[0]} were open"
    if settings.ops_port is not None:
        limits += (
            f" on port {settings.port}, or {OPS_MAX_CONNECTIONS} on the operations port "
            f"{settings.ops_port}"
        )
    return (
        f"the connection opened while {limits} (too_many_connections, "
        "BRIDGE_MAX_CONNECTIONS): answered at once, unread, and closed."
    )


def _ports(settings: Settings) -> str:
    """Which port serves what, when the operations endpoints have their own."""
    if settings.ops_port is None:
        return ""
    return (
        f" This instance serves the webhooks on port {settings.port} (BRIDGE_PORT) only, "
        f"{OPS_PORT_ONLY_NAMED} on port {settings.ops_port} (BRIDGE_OPS_PORT) only "
        "(each is a 404 on the other port), /healthz and /readyz on both."
    )


def _on_the_other_port(settings: Settings, *, webhooks: bool) -> dict[str, Any]:
    """With BRIDGE_OPS_PORT, the 404 of a path asked on the port that does not serve it
    (the document itself is fetched from the operations port, whose webhook paths are
    a 404: a client or a schema-driven test meets it on every call)."""
    if settings.ops_port is None:
        return {}
    if webhooks:
        why = (
            f"Asked on port {settings.ops_port} (BRIDGE_OPS_PORT): the webhooks are served "
            f"on port {settings.port} (BRIDGE_PORT) only."
        )
    else:
        why = (
            f"Asked on port {settings.port} (BRIDGE_PORT): served on port "
            f"{settings.ops_port} (BRIDGE_OPS_PORT) only."
        )
    return {"404": _problem(why)}


def _webhook_operation(settings: Settings, path_params: list[str], method: str) -> dict[str, Any]:
    names = "".join(f"/{{{p}}}" for p in path_params)
    refused = _refusals_on_any_path(settings)
    operation: dict[str, Any] = {
        "operationId": f"{method}Webhook{''.join(p.title() for p in path_params)}",
        "summary": f"Receive a Geins webhook delivery ({WEBHOOK_PATH}{names})",
        "description": (
            "Entity and action are read from the path, then the query, then the top-level "
            "body fields `entity`/`action`. The body, when present, must be a JSON object "
            "whatever the Content-Type says. Without a body the query parameters are published. "
            "A token goes in the Authorization header or the `token` query parameter, never in "
            "the path, the key or a name that makes the topic. Any method but HEAD, OPTIONS, "
            "TRACE and CONNECT that the HTTP parser knows is a delivery (Geins' method is free "
            "text): one OpenAPI cannot name, such as PURGE, is answered as POST is; one the "
            "parser does not know, or in lower case, is a 400. HEAD, OPTIONS, TRACE and "
            "CONNECT get a 405 problem with an Allow header."
        ),
        "parameters": [
            *({"name": p, "in": "path", "required": True, "schema": _NAME} for p in path_params),
            *(
                {"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
                for q in ("entity", "action", "id", "account", "environment")
                if q not in path_params
            ),
            {
                "name": "x-Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Stays the same on Geins' retries; becomes the Kafka key. "
                "Generated when missing. One that holds a webhook token is refused (400).",
                "schema": {"type": "string", "maxLength": MAX_KEY_LENGTH},
            },
            {
                "name": "x-Timestamp",
                "in": "header",
                "required": False,
                "description": "When the event was raised (RFC 3339); the received time "
                "is used when missing or unreadable. One that holds a webhook token is not "
                "published.",
                "schema": {"type": "string"},
            },
        ],
        "security": [{"bearer": []}, {"basic": []}, {"queryToken": []}],
        "responses": {
            "200": {
                "description": "A retry of an event already accepted: not published again.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Answer"}}
                },
                "headers": {"x-bridge-ack": {"$ref": "#/components/headers/x-bridge-ack"}},
            },
            "202": {
                "description": "Accepted: the event is safe by the guarantee `ack` names.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Answer"}}
                },
                "headers": {"x-bridge-ack": {"$ref": "#/components/headers/x-bridge-ack"}},
            },
            "400": _problem(
                "Body not a JSON object, bad x-Idempotency-Key (one holding a webhook token "
                f"included) or query, more than {MAX_CREDENTIALS} credentials "
                "(too_many_credentials: Authorization headers and token parameters together), "
                "a webhook token in "
                "the URL path (token_in_path, once authenticated), not valid HTTP/1.1, "
                "or cut short by a half-close of the connection (413 instead when its "
                "Content-Length is over the limit)."
            ),
            "401": _problem("No valid token.", "WWW-Authenticate"),
            "403": _problem("Client address not in BRIDGE_ALLOWED_NETWORKS."),
            **_on_the_other_port(settings, webhooks=True),
            "408": refused["408"],
            "413": _problem(
                f"Body over {settings.max_body_bytes} bytes, or an event whose Kafka record "
                f"(body and headers) would be over {settings.max_event_record_bytes()} bytes; "
                "in broker mode also an event Kafka refuses for good (over its topic's "
                "max.message.bytes), kept as a dead letter."
            ),
            "414": refused["414"],
            "422": _problem(
                "Entity or action missing, malformed or (strict) unknown, or an entity, "
                "action or topic name that would hold a webhook token."
            ),
            "429": _problem(
                f"Rate limit of this client address, or {_TOO_MANY_PIPELINED}", "Retry-After"
            ),
            "431": refused["431"],
            "500": _problem("A bug; the delivery was not accepted (Geins retries)."),
            "501": refused["501"],
            "503": _problem(
                "The event cannot be made safe now, or more requests are in progress than "
                f"BRIDGE_MAX_CONCURRENCY allows ({settings.max_concurrency}), or their "
                "bodies would hold more bytes than BRIDGE_MAX_BODIES_BYTES allows "
                f"({settings.max_bodies_bytes}); retry. Or: " + _too_many_connections(settings),
                "Retry-After",
            ),
        },
    }
    operation["requestBody"] = {
        "required": False,
        "description": "The user's Geins body template, published byte for byte (a GET's "
        "too, when it has one). Read as JSON whatever its Content-Type.",
        "content": {
            media: {"schema": {"type": "object", "additionalProperties": True}}
            for media in ("application/json", "*/*")
        },
    }
    return operation


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The whole document for this instance."""
    webhook_paths: dict[str, Any] = {}
    for params in ([], ["entity"], ["entity", "action"]):
        path = WEBHOOK_PATH + "".join(f"/{{{p}}}" for p in params)
        # HEAD, OPTIONS and TRACE are refused (405), which the descriptions say: as
        # operations they would be methods the resource supports (its Allow header).
        webhook_paths[path] = {
            method: _webhook_operation(settings, params, method)
            for method in ("get", "post", "put", "patch", "delete")
        }
    text = {"text/plain": {"schema": {"type": "string"}}}
    refused = _refusals_on_any_path(settings)
    status_json = {"application/json": {"schema": {"type": "object"}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Geins → Kafka bridge",
            "version": "1",
            "description": "Receives Geins webhooks and publishes them to Apache Kafka. Known "
            "event types: "
            + "; ".join(f"{e}: {', '.join(a)}" for e, a in ENTITY_ACTIONS.items())
            + "."
            + _ports(settings),
        },
        "paths": {
            **webhook_paths,
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Alive",
                    "responses": {
                        "200": {"description": "alive", "content": status_json},
                        **refused,
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Ready to accept deliveries",
                    "responses": {
                        **refused,
                        "200": {"description": "ready", "content": status_json},
                        "503": {
                            "description": "Not ready; or " + _too_many_connections(settings),
                            "content": {**status_json, **refused["503"]["content"]},
                            "headers": refused["503"]["headers"],
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {"description": "text format", "content": text},
                        **_on_the_other_port(settings, webhooks=False),
                        **refused,
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": {"description": "OpenAPI 3.1", "content": status_json},
                        **_on_the_other_port(settings, webhooks=False),
                        **refused,
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic", "description": "token as password"},
                "queryToken": {"type": "apiKey", "in": "query", "name": "token"},
            },
            "headers": {
                "Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}},
                "WWW-Authenticate": {"schema": {"type": "string"}},
                "Allow": {"schema": {"type": "string"}},
                "x-bridge-ack": {
                    "schema": {"type": "string", "enum": ["durable", "broker", "memory"]}
                },
            },
            "schemas": {
                "Answer": {
                    "type": "object",
                    "required": ["status", "topic", "key", "ack"],
                    "properties": {
                        "status": {"type": "string", "enum": ["accepted", "duplicate"]},
                        "topic": {"type": "string"},
                        "key": {"type": "string"},
                        "ack": _ACK_MODES,
                    },
                },
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail", "reason", "retriable"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "reason": {"type": "string"},
                        "retriable": {"type": "boolean"},
                    },
                },
            },
        },
    }
