"""`python -m services.executor`: runs the executor worker until SIGTERM."""

from __future__ import annotations

import logging

import faust

from schemas.topics import Topics
from services.executor.agents import register
from services.executor.app import create_app, wait_for_kafka
from services.executor.settings import ExecutorSettings


def main() -> None:
    settings = ExecutorSettings()
    wait_for_kafka(settings)
    app, triggers, engine = create_app(settings)
    register(app, triggers, engine, Topics(settings.topic_prefix).dlq, settings.trigger_batch_size)
    # DEBUG logging inside aiokafka's send costs ~11% CPU (docs/decisions.md): keep the clients at WARNING.
    for noisy in ("aiokafka", "kafka", "faust", "mode", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
