"""`thrifty serve`: the app under uvicorn, with a graceful drain on SIGTERM / Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from thrifty.server.app import create_app
from thrifty.server.engine_client import AsyncEngine, Engine

logger = logging.getLogger("thrifty.server")

# After the drain timeout, requests still open get this long before uvicorn cancels them.
CANCEL_GRACE_SECONDS = 5


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT stops new requests (503) and lets the ones in flight finish,
    then exits; a second signal exits at once."""

    def __init__(self, config: uvicorn.Config, client: AsyncEngine, drain_timeout: float) -> None:
        super().__init__(config)
        self.client = client
        self.drain_timeout = drain_timeout
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.client.draining:
            logger.warning("second %s: exiting without waiting for requests in flight", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
            return
        logger.info("%s: draining %d requests in flight, refusing new ones (a second signal exits at once)",
                    signal.Signals(sig).name, self.client.in_flight)
        self.client.begin_drain()  # only sets a flag: safe inside a signal handler

    async def on_tick(self, counter: int) -> bool:
        # Signal handlers cannot await, so the drain starts from uvicorn's 0.1 s tick.
        if self.client.draining and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        if not await self.client.wait_idle(self.drain_timeout):
            logger.warning("%d requests still in flight after %.0f s; cancelling them",
                           self.client.in_flight, self.drain_timeout)
        self.should_exit = True


def serve(engine: Engine, served_model_name: str, host: str, port: int, api_key: str | None = None,
          max_queue: int | None = None, drain_timeout: float = 60.0, log_level: str = "info") -> None:
    """Serve until a signal; blocks."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    client = AsyncEngine(engine, max_queue=max_queue)
    app = create_app(client, served_model_name, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=CANCEL_GRACE_SECONDS)
    DrainingServer(config, client, drain_timeout).run()
