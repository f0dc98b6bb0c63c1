"""The gateway's OpenAPI 3.1 description (``GET /openapi.json``), built once."""

from __future__ import annotations

import json
from typing import Any

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["type", "message", "retryable"],
    "properties": {"type": {"type": "string"}, "message": {"type": "string"},
                   "retryable": {"type": "boolean"}, "code": {"type": "string"},
                   "retry_after": {"type": "number"}, "worker": {"type": "string"},
                   "remote_type": {"type": "string"}},
    "additionalProperties": True}}}
_ANY = {"description": "Any JSON value; numeric arrays as nested lists."}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "An error (docs/http.md: the status table).",
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for c in codes}


def _get(summary: str, ok: str = "OK", *codes: int) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": ok},
                                                       **_errors(*codes)}}}


def document(version: str) -> dict[str, Any]:
    """The description, for gateway ``version``."""
    call = {
        "summary": "Call METHOD of SERVICE with the body as its payload.",
        "parameters": [
            {"name": "service", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "method", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "timeout", "in": "query", "schema": {"type": "number", "exclusiveMinimum": 0,
                                                          "maximum": 86400},
             "description": "Seconds for the whole request, queue and run (a stream: all of it)."},
            {"name": "X-Priority", "in": "header", "schema": {"type": "integer", "minimum": 0,
                                                              "maximum": 1000}},
            {"name": "X-Idempotent", "in": "header", "schema": {"type": "boolean"},
             "description": "true: the request may run again if its worker dies."},
        ],
        "requestBody": {"content": {"application/json": {"schema": _ANY},
                                    "application/msgpack": {"schema": {}}}},
        "responses": {
            "200": {"description": "The method's result, in the request's encoding (or "
                                   "Accept's); with Accept: text/event-stream, events "
                                   "`item`, then `end` or `error`.",
                    "content": {"application/json": {"schema": _ANY},
                                "application/msgpack": {"schema": {}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(400, 401, 404, 413, 415, 429, 500, 502, 503, 504)},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "workerpool HTTP gateway", "version": version,
                 "description": "Calls into a workerpool router, and KServe v2 inference."},
        "components": {"schemas": {"Error": _ERROR},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/{service}/{method}": {"post": call},
            "/health/live": _get("The gateway process runs."),
            "/health/ready": _get("Every service has a serving worker; the body lists each "
                                  "service's workers, in_flight and queued.", "Ready", 503),
            "/metrics": _get("The gateway's Prometheus metrics (text format)."),
            "/openapi.json": _get("This document."),
            "/v2": _get("KServe v2 server metadata."),
            "/v2/health/live": _get("KServe v2: live."),
            "/v2/health/ready": _get("KServe v2: ready (400 when not).", "Ready", 400),
            "/v2/models/{name}": _get("KServe v2 model metadata.", "OK", 404),
            "/v2/models/{name}/ready": _get("KServe v2: the model serves (400 when not).",
                                            "Ready", 400, 404),
            "/v2/models/{name}/infer": {"post": {
                "summary": "KServe v2 inference: JSON tensors, or the binary tensor "
                           "extension (Inference-Header-Content-Length).",
                "responses": {"200": {"description": "The outputs."},
                              **_errors(400, 401, 404, 413, 429, 500, 502, 503, 504)}}},
        },
    }


def render(version: str) -> bytes:
    return json.dumps(document(version), separators=(",", ":")).encode()
