"""One error shape for the whole API, produced here and nowhere else.

``{"error": {"code", "message", "path", "timestamp"}}``, plus ``fields`` on a
422 naming each bad field. h2k's own errors map onto statuses; anything
unexpected is logged once with its traceback and answered 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from h2k.errors import (
    Conflict,
    H2KError,
    InvalidInput,
    NotFound,
    StateError,
    Unavailable,
)
from h2k.store.jobs import isoformat, utcnow
from h2k.submission import describe_fields, flatten_messages

log = logging.getLogger(__name__)

STATUS_OF: dict[type[H2KError], int] = {
    InvalidInput: 422,
    NotFound: 404,
    Conflict: 409,
    StateError: 400,
    Unavailable: 503,
}


def envelope(
    code: int, message: str, fields: dict[str, list[str]] | None = None
) -> Response:
    body: dict[str, Any] = {
        "code": code,
        "message": message,
        "path": request.path,
        "timestamp": isoformat(utcnow()),
    }
    if fields:
        body["fields"] = fields
    response = jsonify({"error": body})
    response.status_code = code
    return response


def http_error(error: HTTPException) -> Response:
    code = error.code or 500
    data = getattr(error, "data", None) or {}
    messages = data.get("messages")
    if code == 422 and messages:
        # webargs nests messages under the location ("json", "query", ...).
        located = {
            key: value
            for location in messages.values()
            for key, value in (location.items() if isinstance(location, dict) else [])
        }
        fields = flatten_messages(located)
        return envelope(422, f"Invalid request: {describe_fields(fields)}", fields)
    message = data.get("message") or error.description or error.name
    if code == 400 and request.mimetype == "application/json":
        problem = _json_problem()
        if problem:
            message = f"The request body is not valid JSON: {problem}"
    if code == 405:
        message = f"Method {request.method} is not allowed on {request.path}"
    elif code == 404 and request.url_rule is None:
        message = f"No such endpoint: {request.path}"
    return envelope(code, str(message))


def _json_problem() -> str | None:
    try:
        json.loads(request.get_data(cache=True) or b"null")
    except ValueError as exc:
        return str(exc)
    return None


def h2k_error(error: H2KError) -> Response:
    status = next(
        (code for kind, code in STATUS_OF.items() if isinstance(error, kind)), 500
    )
    if isinstance(error, InvalidInput):
        return envelope(status, error.message, error.fields)
    if status == 500:
        log.error("%s %s failed", request.method, request.path, exc_info=error)
    return envelope(status, str(error))


def redis_error(error: redis.RedisError) -> Response:
    return envelope(503, f"Redis is unreachable: {error}")


def unexpected_error(error: Exception) -> Response:
    log.error("%s %s failed", request.method, request.path, exc_info=error)
    return envelope(500, "Internal server error; the failure is logged")


def install(app: Flask) -> None:
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(H2KError, h2k_error)
    app.register_error_handler(redis.RedisError, redis_error)
    app.register_error_handler(Exception, unexpected_error)
