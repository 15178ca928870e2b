"""The generator service's FastAPI app. The base model loads in the lifespan (in the background)."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from services.generator.checkpoints import CheckpointStore
from services.generator.engine import GenerationItem, generate_batch
from services.generator.openai_compat import OpenAIError, openai_error_handler
from services.generator.routes import GeneratorMetrics, Streams, build_router
from services.generator.scheduler import Scheduler
from services.generator.settings import GeneratorSettings
from shared.batching import Batcher
from shared.runtime import resolve_device
from shared.server import BackgroundLoad, add_operational_routes, create_service_app

log = logging.getLogger(__name__)


def create_app(settings: GeneratorSettings) -> FastAPI:
    async def shutdown() -> None:
        streams.close()
        await batcher.close()

    loading = BackgroundLoad("generator base model", lambda: store.load_base(),
                             exit_on_failure=settings.exit_on_load_failure)
    lifespan = loading.lifespan(settings.torch_threads, shutdown)
    app = create_service_app(title="Generator service", namespace="generator",
                             max_body_bytes=settings.max_body_bytes, lifespan=lifespan)
    app.add_exception_handler(OpenAIError, openai_error_handler)  # OpenAI's `param` and `code` as well
    metrics = GeneratorMetrics(app.state.registry)
    store = CheckpointStore(settings.model, settings.checkpoints, resolve_device(settings.device),
                            settings.max_loaded_checkpoints, settings.revision, settings.max_concurrent_loads)
    b = settings.batching
    streams = Streams(b.max_streams)
    if b.mode == "continuous":
        batcher = Scheduler(max_batch_size=b.max_batch_size, max_batch_tokens=b.max_batch_tokens,
                            max_queue_size=b.max_queue_size, join_wait_steps=b.join_wait_steps,
                            on_batch=metrics.observe_batch, on_first_token=metrics.first_token.observe)
        run_stream = batcher.stream
    else:
        batcher = Batcher(
            generate_batch, cost=GenerationItem.cost, key=GenerationItem.batch_key, max_batch_size=b.max_batch_size,
            max_batch_tokens=b.max_batch_tokens, max_wait_ms=b.max_wait_ms, max_queue_size=b.max_queue_size,
            on_batch=metrics.observe_batch)
        run_stream = streams.generate  # one at a time, on the streams' own thread

    app.state.store, app.state.batcher, app.state.streams, app.state.settings = store, batcher, streams, settings
    app.state.loading = loading
    app.state.before_scrape.append(lambda: metrics.loaded.set(store.resident))
    # Ready once the base model is in memory and while the batch worker lives (it restarts by itself).
    add_operational_routes(app, app.state.registry, lambda: loading.not_ready or batcher.worker_error)
    app.include_router(build_router(settings, store, batcher, metrics, lambda: loading.not_ready, streams,
                                   run_stream))
    return app
