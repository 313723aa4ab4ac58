"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.responses import RedirectResponse

from app import __doc__ as summary
from app.adapters.endpoints import router as adapters_router
from app.base_models.endpoints import router as models_router
from app.deps import get_caller
from app.errors import ERROR_RESPONSES, OPENAI_ERROR_RESPONSES, install_error_handlers
from app.exports.endpoints import router as exports_router
from app.files.endpoints import router as files_router
from app.inference.endpoints import router as inference_router
from app.inference.engine import InferenceEngine
from app.jobs.endpoints import router as jobs_router
from app.logs import configure_logging
from app.observability.endpoints import metrics_router, readiness_router
from app.observability.metrics import make_registry
from app.openai.completions import router as openai_completions_router
from app.openai.files import router as openai_files_router
from app.openai.fine_tuning import router as openai_fine_tuning_router
from app.openai.models import router as openai_models_router
from app.request_size import RequestSizeLimit
from app.settings import Settings, get_settings
from app.ui.endpoints import router as ui_router


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.settings.ensure_dirs()
    yield
    app.state.engine.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The api; `settings` replaces the environment's (tests, embedding)."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)
    app = FastAPI(title="tuneserve", description=summary or "", version="0.1.0", lifespan=lifespan)
    if settings is not get_settings():
        app.dependency_overrides[get_settings] = lambda: settings
    app.state.settings = settings
    # Prometheus figures of this app (a registry of its own: tests make several apps).
    app.state.metrics_registry, inference_metrics = make_registry()
    app.state.engine = InferenceEngine(settings, inference_metrics)  # loads models on first use
    install_error_handlers(app)
    app.add_middleware(RequestSizeLimit, settings=settings)
    # Every route but health needs an API key (401 without one); see app/deps.py.
    authenticated = [Depends(get_caller)]
    native = (
        jobs_router,
        files_router,
        adapters_router,
        exports_router,
        inference_router,
        models_router,
    )
    for router in native:
        app.include_router(router, dependencies=authenticated, responses=ERROR_RESPONSES)
    # The OpenAI-compatible surface: a translation over the same services, OpenAI's error shape.
    openai = (
        openai_files_router,
        openai_fine_tuning_router,
        openai_models_router,
        openai_completions_router,
    )
    for router in openai:
        app.include_router(router, dependencies=authenticated, responses=OPENAI_ERROR_RESPONSES)
    # The dashboard's pages are public: they hold no data and call the API with the user's key.
    app.include_router(ui_router)

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/ui")

    @app.get("/healthz", tags=["health"], summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(readiness_router)
    # Scrapers seldom hold an API key: /metrics is public unless TUNESERVE_METRICS_PUBLIC=false.
    scrapers = [] if settings.metrics_public else authenticated
    app.include_router(metrics_router, dependencies=scrapers)

    return app
