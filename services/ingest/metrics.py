"""Every Prometheus object of ingest, defined once."""

from prometheus_client import Counter, Histogram

TRIGGERS = Counter("flowtrail_ingest_triggers_total", "Run requests appended to the triggers topic", ["mode"])
APPEND_SECONDS = Histogram(
    "flowtrail_ingest_append_seconds", "Time until a request's triggers are durable in Kafka",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 2.5, 10),
)  # fmt: skip
