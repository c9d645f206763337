"""Every Prometheus object of the projector, defined once."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("flowtrail_projector_events_total", "Ledger events read", ["outcome"])
BATCHES = Histogram(
    "flowtrail_projector_batch_seconds", "Time to apply one batch transaction",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)  # fmt: skip
BATCH_SIZE = Histogram(
    "flowtrail_projector_batch_events", "Records per batch", buckets=(1, 10, 50, 100, 500, 1000, 5000)
)
DEAD_LETTERS = Counter("flowtrail_projector_dead_letters_total", "Undecodable records sent to the DLQ")
ASSIGNED = Gauge("flowtrail_projector_assigned_partitions", "Partitions this process projects")
SCHEMA_SWAPS = Counter(
    "flowtrail_projector_schema_swaps_total", "Times a rebuild swapped the schema under this process"
)
PURGED_RUNS = Counter("flowtrail_projector_purged_runs_total", "Runs deleted by the retention purge")
OUT_OF_ORDER = Counter("flowtrail_projector_out_of_order_total", "Run status changes the transition table forbids")
WEBHOOK_DELIVERIES = Counter("flowtrail_projector_webhook_deliveries_total", "Webhook delivery attempts", ["outcome"])
RUNS_FINISHED = Counter("flowtrail_projector_runs_finished_total", "Runs projected into a final status", ["status"])
LAG = Gauge("flowtrail_projector_lag_records", "Records behind the partition's end, after the last batch",
            ["topic", "partition"])  # fmt: skip
