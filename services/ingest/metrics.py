"""Every Prometheus object of ingest, defined once."""

from prometheus_client import Counter, Gauge, Histogram

TRIGGERS = Counter("flowtrail_ingest_triggers_total", "Run requests appended to the triggers topic", ["mode"])
APPEND_SECONDS = Histogram(
    "flowtrail_ingest_append_seconds", "Time until a request's triggers are durable in Kafka",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 2.5, 10),
)  # fmt: skip
APPEND_FAILURES = Counter(
    "flowtrail_ingest_append_failures_total",
    "Trigger requests not wholly appended (answered 503); the producer is rebuilt",
)

# Scheduler (services/ingest/scheduler.py)
SCHEDULES = Gauge("flowtrail_ingest_schedules", "Flows with a runnable schedule, paused ones included")
SCHEDULE_TICKS = Counter("flowtrail_ingest_schedule_ticks_total", "Schedule ticks appended as triggers")
SCHEDULE_SKIPPED = Counter(
    "flowtrail_ingest_schedule_skipped_ticks_total",
    "Missed schedule ticks not fired: older than the newest missed one, or past the catch-up bound",
)
SCHEDULE_INVALID = Counter(
    "flowtrail_ingest_schedule_invalid_total", "Published flow versions whose schedule cannot run (bad cron, …)"
)
SCHEDULE_LATENESS = Histogram(
    "flowtrail_ingest_schedule_lateness_seconds", "From a tick's time until its trigger is durable in Kafka",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 600, 3600),
)  # fmt: skip

# Kafka-triggered flows (services/ingest/adapters/kafka_triggers.py, docs/kafka-triggers.md)
_FLOW_TOPIC = ["tenant", "flow", "topic"]
KAFKA_TRIGGER_MESSAGES = Counter(
    "flowtrail_ingest_kafka_trigger_messages_total",
    "Messages of kafka-triggered flows' topics, by outcome: run, filtered (key pattern or filter), dead_lettered",
    [*_FLOW_TOPIC, "outcome"],
)
KAFKA_TRIGGER_LAG = Gauge(
    "flowtrail_ingest_kafka_trigger_lag",
    "Messages of a flow's topic not yet made into runs, on the partitions this process holds (sum over replicas)",
    _FLOW_TOPIC,
)
KAFKA_TRIGGER_PAUSED = Gauge(
    "flowtrail_ingest_kafka_trigger_paused",
    "1 while a kafka-triggered flow is paused (nothing is consumed)",
    _FLOW_TOPIC,
)
KAFKA_TRIGGER_SUBSCRIPTIONS = Gauge(
    "flowtrail_ingest_kafka_trigger_subscriptions", "Kafka-triggered flows this process reads, paused ones included"
)
KAFKA_TRIGGER_UNSTARTED = Gauge(
    "flowtrail_ingest_kafka_trigger_unstarted",
    "1 while a kafka-triggered flow's consumer cannot start, by reason: unknown_connector, blocked_address, "
    "unresolvable_host, connector_unusable, secret_not_found, … (retried every few seconds)",
    [*_FLOW_TOPIC, "reason"],
)
KAFKA_TRIGGER_APPEND_FAILURES = Counter(
    "flowtrail_ingest_kafka_trigger_append_failures_total",
    "Batches of kafka triggers not wholly durable at once (appended again; their offsets wait)",
)
KAFKA_TRIGGER_EXECUTOR_BACKLOG = Gauge(
    "flowtrail_ingest_kafka_trigger_executor_backlog",
    "Triggers the executor has not yet taken; kafka triggers wait while it is over the limit",
)
