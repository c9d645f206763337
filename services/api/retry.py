"""FROM_FAILED_STEP: which steps of a run its retry reuses, read from the run's steps (run_steps rows). Pure.

Every step that SUCCEEDED in the run is reused, whether it ran there or was itself reused there from an earlier
run of the retry chain, so a retry of a retry of a retry runs again nothing that succeeded anywhere in the chain.
Neither position nor order decides it: a reused step recorded before reused steps carried their position sorts
last, and it is reused all the same. A step with failed records runs again, for those records only.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.events import ReusedStep


@dataclass(frozen=True)
class Reuse:
    outputs: dict[str, Any] = field(default_factory=dict)  # TriggerReceived.reuse
    steps: dict[str, ReusedStep] = field(default_factory=dict)  # TriggerReceived.reused


def plan_reuse(run_id: str, steps: Iterable[Mapping[str, Any]], rerun: Collection[str] = ()) -> Reuse:
    """`steps`: the run's run_steps rows (step, status, input, output, extractions, reused_from); `rerun`: the
    steps that run again whatever their status (a sync step with failed records)."""
    out = Reuse()
    for s in steps:
        if s["status"] != "SUCCEEDED" or s["step"] in rerun:
            continue
        out.outputs[s["step"]] = s["output"]
        out.steps[s["step"]] = ReusedStep(
            # Where it ran: the run that reused it names that run; a step that ran in this run, this run.
            run_id=s["reused_from"] or run_id,
            input=s["input"],
            extractions=s["extractions"] or {},
        )
    return out
