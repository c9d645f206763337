"""Every Prometheus object of the executor, defined once."""

from prometheus_client import Counter, Gauge, Histogram

TRIGGERS = Counter("flowtrail_executor_triggers_total", "Triggers consumed", ["outcome"])
EVENTS = Counter("flowtrail_executor_events_total", "Ledger events appended", ["type"])
ACTIVE_RUNS = Gauge("flowtrail_executor_active_runs", "Runs not yet in a terminal status")
STEP_SECONDS = Histogram(
    "flowtrail_executor_step_seconds", "Step runner duration", ["action", "outcome"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
)  # fmt: skip
REPLAY_EVENTS = Counter(
    "flowtrail_executor_replayed_events_total", "Ledger events replayed on assignment (after the snapshot, if one)"
)
SNAPSHOTS = Counter("flowtrail_executor_snapshots_total", "Partition snapshots written or not", ["outcome"])
SNAPSHOT_LOADS = Counter(
    "flowtrail_executor_snapshot_loads_total",
    "Snapshots read (replays, the periodic writer) by what became of them",
    ["outcome"],
)
SNAPSHOT_BYTES = Gauge("flowtrail_executor_snapshot_bytes", "Size of the last snapshot written")
INTERNAL_ERRORS = Counter("flowtrail_executor_internal_errors_total", "Runs ended INTERNAL_ERROR")
COMMANDS = Counter("flowtrail_executor_commands_total", "Commands consumed", ["type", "outcome"])
REPLAY_SECONDS = Histogram(
    "flowtrail_executor_replay_seconds", "Time to rebuild one assigned partition's runs from the ledger",
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 1200),
)  # fmt: skip
ADMISSIONS = Counter(
    "flowtrail_executor_admissions_total",
    "Shared admissions of runs of limited flows or tenants with a quota, by outcome (granted, blocked, refused)",
    ["outcome"],
)
ADMISSION_WAKEUPS = Counter(
    "flowtrail_executor_admission_wakeups_total",
    "BLOCKED runs woken because a slot of their flow was freed, by how (local, command, sweep)",
    ["via"],
)
ADMISSION_ERRORS = Counter(
    "flowtrail_executor_admission_errors_total", "Shared admission calls that failed and were retried (PostgreSQL away)"
)
