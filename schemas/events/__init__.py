"""Ledger, flow and trigger events and commands: frozen pydantic models in one discriminated union each.

One module a responsibility (docs/architecture.md#events): `common` (ids, trigger and error shapes, the envelope),
`runs`, `steps` and `records` (each event with its payload), `ledger` (the one list of event types), `flow_events`
(the flows topic), `inputs` (triggers and commands). Import from here: this package re-exports every public name.
"""

from __future__ import annotations

from schemas.events.common import *  # noqa: F403
from schemas.events.flow_events import *  # noqa: F403
from schemas.events.inputs import *  # noqa: F403
from schemas.events.ledger import *  # noqa: F403
from schemas.events.records import *  # noqa: F403
from schemas.events.runs import *  # noqa: F403
from schemas.events.steps import *  # noqa: F403
from schemas.flows import Environment as Environment
