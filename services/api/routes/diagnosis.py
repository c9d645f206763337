"""GET /v1/runs/{id}/diagnosis: why a run failed, decided from the read models (docs/runs.md, Diagnosis)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from services.api import diagnosis
from services.api.adapters import diagnosis as store
from services.api.models.diagnosis import RunDiagnosis
from services.api.routes import Reader, found

router = APIRouter()


@router.get("/v1/runs/{run_id}/diagnosis")
async def get_run_diagnosis(
    run_id: str,
    request: Request,
    principal: Reader,
    last_n: Annotated[
        int, Query(ge=1, le=500, description="how many of the flow's runs, up to this one, to look for its error in")
    ] = 50,
) -> RunDiagnosis:
    """The failing step and its error (actual vs expected for an assertion), the same fingerprint across the flow's
    last `last_n` runs (first seen, since which version, whether it passed on retry), the health of the connector or
    host the step called around the run's time, the root cause the rules decide (each rule that fired, with the
    values it saw) and a next action written from them. A run that did not fail answers 200 with `failed: false`
    and no `diagnosis`."""
    pool = request.app.state.pool
    run = found(await store.get_run(pool, principal.tenant_id, principal.environment, run_id), "run", run_id)
    about = {"run_id": run["id"], "flow_id": run["flow_id"], "flow_version": run["flow_version"],
             "status": run["status"]}  # fmt: skip
    if run["status"] not in diagnosis.DIAGNOSED:
        return RunDiagnosis(**about, failed=False, message=diagnosis.not_failed(run["status"]), diagnosis=None)
    found_out = diagnosis.diagnose(await store.signals(pool, principal.tenant_id, principal.environment, run, last_n))
    message = f"the run ended {run['status']}; root cause: {found_out.root_cause}"
    return RunDiagnosis(**about, failed=True, message=message, diagnosis=found_out)
