"""`python -m services.api`: serves the runs API until SIGTERM."""

from __future__ import annotations

import logging

import uvicorn

from services.api.app import create_app
from services.api.settings import ApiSettings


def main() -> None:
    settings = ApiSettings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=10
    )


if __name__ == "__main__":
    main()
