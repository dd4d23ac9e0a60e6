"""Health and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, request
from flask_smorest import Blueprint
from prometheus_client import CollectorRegistry, generate_latest

from h2k import schemas
from h2k.errors import Unavailable
from h2k.states import ACTIVE
from h2k.store.jobs import isoformat, utcnow
from h2k.store.metrics import MigrationMetrics
from web.services import services

blp = Blueprint("monitoring", __name__, description="Health and metrics")


@blp.route("/health")
@blp.response(200, schemas.HealthSchema)
@blp.alt_response(
    503, schema=schemas.ErrorEnvelopeSchema, description="Redis is unreachable"
)
def health() -> Any:
    """Health for load balancers: Redis reachable, workers and active jobs"""
    h2k_services = services()
    try:
        h2k_services.redis.ping()
    except Exception as exc:
        raise Unavailable(f"Redis is unreachable: {exc}") from exc
    return {
        "status": "healthy",
        "version": "v1",
        "timestamp": isoformat(utcnow()),
        "workers": h2k_services.workers.count_active(),
        "active_jobs": h2k_services.jobs.count_in_states(ACTIVE),
        "checks": {"redis": "ok"},
    }


@blp.route("/metrics")
@blp.doc(
    responses={
        "200": {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    }
)
def metrics() -> Response:
    """Migration metrics from Redis, and HTTP metrics of this API"""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MigrationMetrics(services().redis))
    migration = generate_latest(registry).decode()
    http, content_type = current_app.extensions["h2k_http_metrics"].generate_metrics(
        request.headers.get("Accept")
    )
    return Response(migration + http, content_type=content_type)
