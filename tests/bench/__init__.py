"""Benchmarks: Flowtrail's figures as ratios against raw Kafka and PostgreSQL ceilings measured in the same run."""
