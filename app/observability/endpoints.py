"""GET /metrics (Prometheus) and GET /readyz; /healthz (the process is up) is in app/main.py.

Both are for scrapers and probes, not API clients: they stay out of the OpenAPI schema and are
described in docs/observability.md.
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from app.observability.readiness import readiness

metrics_router = APIRouter(include_in_schema=False)
readiness_router = APIRouter(include_in_schema=False)


@metrics_router.get("/metrics")
def metrics(request: Request) -> Response:
    """The Prometheus text format, or OpenMetrics when the scraper's Accept header asks for it.
    A sync route: the job figures come from SQL, in the thread pool."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(content=encode(registry), headers={"Content-Type": content_type})


@readiness_router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """200 when `SELECT 1` works on the database and the Celery broker answers, each within a
    few seconds; 503 with the failing check's error otherwise. For a load balancer's or
    Kubernetes' readiness probe (/healthz only says the process is up)."""
    checks = readiness(request.app.state.settings)
    ready = all(check.ok for check in checks.values())
    body = {
        "status": "ready" if ready else "not_ready",
        "checks": {
            name: {key: value for key, value in asdict(check).items() if value is not None}
            for name, check in checks.items()
        },
    }
    return JSONResponse(body, status_code=200 if ready else 503)
