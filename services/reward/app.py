"""The reward service's FastAPI app. Models load in the lifespan (in the background), never at import."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from services.reward.compat import build_compat_router
from services.reward.metrics import RewardMetrics
from services.reward.registry import ModelRegistry
from services.reward.routes import ScoringPath, build_router
from services.reward.settings import RewardSettings
from shared.runtime import resolve_device
from shared.schemas import ModelSpec
from shared.server import BackgroundLoad, add_operational_routes, create_service_app

log = logging.getLogger(__name__)


def create_app(settings: RewardSettings) -> FastAPI:
    async def load_startup_models() -> None:
        for spec in settings.models:
            try:
                await registry.put(spec.name, ModelSpec(**spec.model_dump(exclude={"name"})))
            except Exception as exc:
                if len(settings.models) == 1:
                    raise
                raise RuntimeError(f"{spec.name!r}: {exc}") from exc  # which of them

    loading = BackgroundLoad("reward model", load_startup_models, exit_on_failure=settings.exit_on_load_failure)
    lifespan = loading.lifespan(settings.torch_threads, lambda: registry.close())
    app = create_service_app(title="Reward service", namespace="reward", max_body_bytes=settings.max_body_bytes,
                             lifespan=lifespan)
    registry = ModelRegistry(settings.batching, resolve_device(settings.device), RewardMetrics(app.state.registry),
                             settings.max_models)
    app.state.models, app.state.loading = registry, loading
    app.state.settings = settings
    app.state.before_scrape.append(registry.refresh_gauges)

    def not_ready() -> str | None:
        if loading.loading:
            return loading.loading
        if not len(registry):
            return f"no model is loaded ({loading.not_ready})" if loading.not_ready else "no model is loaded"
        return registry.unhealthy()

    add_operational_routes(app, app.state.registry, not_ready)
    # OpenRLHF's /get_reward and TEI's /predict (and POST /), on the same scoring path and key as /v1/score. Before
    # /v1 in the schema: tests/reliability/test_fuzz_openapi.py walks it in order and DELETE /v1/models empties it.
    app.include_router(build_compat_router(settings, ScoringPath(settings, registry, lambda: loading.loading)))
    app.include_router(build_router(settings, registry, lambda: loading.loading))
    return app
