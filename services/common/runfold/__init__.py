"""A run's read-model rows folded from its ledger events, pure: the projector applies them, the API's `?as_of=`
reads a run as it stood (docs/architecture.md, "How a run flows through the code").

`rows` folds the runs and run_steps rows, `details` the attempts, logs, record errors, failure groups and rollups,
`fingerprint` the normalisations behind failure groups and endpoint coverage.
"""
