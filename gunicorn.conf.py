"""gunicorn settings for the h2k API.

``gunicorn -c gunicorn.conf.py 'web:create_app()'``.

SSE clients hold a connection for as long as they watch a job, so workers
are threaded. HTTP metrics are shared across worker processes through
PROMETHEUS_MULTIPROC_DIR (set it to an empty directory).
"""

import os

bind = os.environ.get("H2K_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("H2K_API_PROCESSES", "4"))
worker_class = "gthread"
threads = int(os.environ.get("H2K_API_THREADS", "64"))
timeout = 120
graceful_timeout = 10
accesslog = "-"


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_flask_exporter.multiprocess import (
            GunicornPrometheusMetrics,
        )

        GunicornPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)
