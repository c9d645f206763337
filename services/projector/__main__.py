"""`python -m services.projector`: projects the ledger into PostgreSQL until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from services.projector.app import create_web_app
from services.projector.collector import tune_for_projecting
from services.projector.consumer import Projector
from services.projector.settings import ProjectorSettings


async def serve(settings: ProjectorSettings) -> None:
    projector = Projector(settings)
    # The web pages first: /healthz answers and /readyz says what the start waits for (PostgreSQL, Kafka).
    runner = web.AppRunner(create_web_app(projector), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.http_host, settings.http_port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(stop.wait())
    tasks: list[asyncio.Task[None]] = []
    try:
        starting = asyncio.create_task(projector.start())
        await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        starting.result()
        tune_for_projecting()
        work = asyncio.create_task(projector.run())
        tasks = [work, asyncio.create_task(projector.retention_loop()), asyncio.create_task(projector.webhook_loop())]
        done, _ = await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            work.result()  # a crash surfaces here and the supervisor restarts the process
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await projector.stop()
        await runner.cleanup()


def main() -> None:
    settings = ProjectorSettings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
