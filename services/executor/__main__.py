"""`python -m services.executor`: answers its probes at once, then runs the executor worker until SIGTERM."""

from __future__ import annotations

import logging

from services.executor.probes import StartupProbes
from services.executor.settings import ExecutorSettings

# Allocations between young garbage collections (700 by default; services/common/collector.py). Measured in one
# process, decide + fold + encode of a 10-step run beside a long-lived heap: 1,058 -> 928 us of CPU (median of 4).
YOUNG_COLLECTION_EVERY = 20_000


def main() -> None:
    settings = ExecutorSettings()
    # Importing faust, aiohttp and the engine takes seconds on a loaded machine: /healthz and /readyz answer
    # meanwhile, and the worker's web server takes their socket over (docs/operations.md).
    probes = StartupProbes(settings.web_host, settings.web_port)
    import faust

    from schemas.topics import Topics
    from services.executor.agents import register
    from services.executor.app import create_app, wait_for_kafka

    wait_for_kafka(settings, probes)
    app, triggers, engine = create_app(settings, probes)
    register(app, triggers, engine, Topics(settings.topic_prefix).dlq, settings.trigger_batch_size)
    # DEBUG logging inside aiokafka's send costs ~11% CPU (docs/decisions.md): keep the clients at WARNING.
    for noisy in ("aiokafka", "kafka", "faust", "mode", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    from services.common.collector import tune_collector

    tune_collector(YOUNG_COLLECTION_EVERY)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
