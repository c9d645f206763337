"""`python -m services.projector`: projects the ledger into PostgreSQL until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from services.common.db import connect
from services.common.migrate import migrate
from services.projector.app import create_web_app
from services.projector.consumer import Projector
from services.projector.settings import ProjectorSettings


async def serve(settings: ProjectorSettings) -> None:
    conn = await connect(settings.database_url, settings.database_schema)
    try:
        await migrate(conn, settings.database_schema)
    finally:
        await conn.close()
    projector = Projector(settings)
    await projector.start()
    runner = web.AppRunner(create_web_app(projector), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.http_host, settings.http_port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    work = asyncio.create_task(projector.run())
    purger = asyncio.create_task(projector.retention_loop())
    sender = asyncio.create_task(projector.webhook_loop())
    waiter = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            work.result()  # a crash surfaces here and the supervisor restarts the process
    finally:
        purger.cancel()
        sender.cancel()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        await projector.stop()
        await runner.cleanup()


def main() -> None:
    settings = ProjectorSettings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
