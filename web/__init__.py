"""The Flask side of h2k: ``flask --app web run``, ``gunicorn 'web:create_app()'``."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask
from flask_smorest import Api
from prometheus_client import CollectorRegistry

from h2k import schemas
from h2k.config import Settings
from web import errors, services

API_DOC = {
    "API_TITLE": "h2k",
    "API_VERSION": "1.0",
    "OPENAPI_VERSION": "3.0.3",
    "OPENAPI_URL_PREFIX": "/",
    "OPENAPI_JSON_PATH": "openapi.json",
    "OPENAPI_SWAGGER_UI_PATH": "/docs",
    "OPENAPI_SWAGGER_UI_URL": "https://cdn.jsdelivr.net/npm/swagger-ui-dist/",
    "OPENAPI_REDOC_PATH": "/redoc",
    "OPENAPI_REDOC_URL": (
        "https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js"
    ),
}


class H2KApi(Api):
    """flask-smorest's Api, answering every error in h2k's one envelope."""

    ERROR_SCHEMA = schemas.ErrorEnvelopeSchema

    def handle_http_exception(self, error: Any) -> Any:
        return errors.http_error(error)


def _http_metrics(app: Flask) -> Any:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_flask_exporter.multiprocess import (
            GunicornPrometheusMetrics,
        )

        return GunicornPrometheusMetrics(app)
    from prometheus_flask_exporter import PrometheusMetrics

    return PrometheusMetrics(app, path=None, registry=CollectorRegistry())


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(API_DOC)
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.config.update(config or {})
    settings = app.config.get("H2K_SETTINGS") or Settings.from_env()
    app.config["REDIS_URL"] = settings.redis_url

    services.build(app, settings)
    errors.install(app)
    app.extensions["h2k_http_metrics"] = _http_metrics(app)

    from web import fleet, jobs, monitoring

    api = H2KApi(app)
    api.register_blueprint(jobs.blp)
    api.register_blueprint(fleet.blp)
    api.register_blueprint(monitoring.blp)
    return app
