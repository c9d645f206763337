-- Shared admission (docs/architecture.md, Admission): the slots of flows with a concurrency limit and of tenants with a
-- quota, shared by every executor, so a limit holds exactly however many executors run. A row is coordination state
-- derived from the ledger (an executor reconciles its partitions' rows with their runs on assignment), never a read
-- model: rebuild and verify leave these tables alone.

-- A run that holds a slot: RUNNING or PAUSED (or granted a moment before its RunStarted is appended).
CREATE TABLE admission_slots (
    run_id      text PRIMARY KEY,
    tenant_id   text NOT NULL,
    flow_id     text NOT NULL,
    partition   int NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX admission_slots_flow ON admission_slots (tenant_id, flow_id);
CREATE INDEX admission_slots_partition ON admission_slots (partition);

-- A BLOCKED run waiting for a slot of its flow; `arrival` is the order every executor serves them in.
CREATE TABLE admission_queue (
    run_id      text PRIMARY KEY,
    tenant_id   text NOT NULL,
    flow_id     text NOT NULL,
    partition   int NOT NULL,
    flow_limit  int NOT NULL,
    arrival     bigint GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX admission_queue_flow ON admission_queue (tenant_id, flow_id, arrival);
CREATE INDEX admission_queue_partition ON admission_queue (partition);

-- A run asks to start: 'granted' (it holds a slot now, or already did), 'blocked' (it waits in its flow's queue) or
-- 'refused' (its tenant is at its quota). The same order of checks as the executor's `decide`: a BLOCKED run
-- (`p_waiting`) stays waiting while its flow is full, then meets the tenant's quota; any other run meets the quota
-- first, then the flow's limit counting the runs waiting ahead of it. One tenant's admissions are serialised by an
-- advisory lock, so two executors never both take the last slot.
CREATE FUNCTION admit_run(
    p_run text, p_tenant text, p_flow text, p_partition int, p_flow_limit int, p_tenant_limit int, p_waiting boolean,
    OUT outcome text, OUT flow_active int, OUT tenant_active int, OUT queued_ahead int
) LANGUAGE plpgsql AS $$
DECLARE
    v_arrival bigint;
    v_flow_full boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('flowtrail-admission:' || p_tenant));
    SELECT count(*) FILTER (WHERE s.flow_id = p_flow), count(*)
      INTO flow_active, tenant_active
      FROM admission_slots s WHERE s.tenant_id = p_tenant;
    IF EXISTS (SELECT 1 FROM admission_slots s WHERE s.run_id = p_run) THEN
        outcome := 'granted';  -- asked again after a crash between the grant and its RunStarted
        queued_ahead := 0;
        RETURN;
    END IF;
    IF p_waiting AND p_flow_limit IS NOT NULL THEN  -- a BLOCKED run whose row is gone (PostgreSQL restored) queues again
        INSERT INTO admission_queue (run_id, tenant_id, flow_id, partition, flow_limit)
        VALUES (p_run, p_tenant, p_flow, p_partition, p_flow_limit) ON CONFLICT (run_id) DO NOTHING;
    END IF;
    SELECT q.arrival INTO v_arrival FROM admission_queue q WHERE q.run_id = p_run;
    SELECT count(*) INTO queued_ahead FROM admission_queue q
     WHERE q.tenant_id = p_tenant AND q.flow_id = p_flow AND (v_arrival IS NULL OR q.arrival < v_arrival);
    v_flow_full := p_flow_limit IS NOT NULL AND flow_active + queued_ahead >= p_flow_limit;
    IF p_waiting AND v_flow_full THEN
        outcome := 'blocked';
    ELSIF p_tenant_limit IS NOT NULL AND tenant_active >= p_tenant_limit THEN
        DELETE FROM admission_queue WHERE run_id = p_run;
        outcome := 'refused';
    ELSIF v_flow_full THEN
        INSERT INTO admission_queue (run_id, tenant_id, flow_id, partition, flow_limit)
        VALUES (p_run, p_tenant, p_flow, p_partition, p_flow_limit) ON CONFLICT (run_id) DO NOTHING;
        outcome := 'blocked';
    ELSE
        DELETE FROM admission_queue WHERE run_id = p_run;
        INSERT INTO admission_slots (run_id, tenant_id, flow_id, partition) VALUES (p_run, p_tenant, p_flow, p_partition);
        outcome := 'granted';
    END IF;
END $$;

-- A run no longer holds a slot or waits (it ended, or was canceled while BLOCKED): its rows go, and the runs of its
-- flow's queue that may start now (arrival order, as many as there are free slots) are returned to be woken.
CREATE FUNCTION release_run(p_run text, p_tenant text, p_flow text)
RETURNS TABLE (run_id text, partition int) LANGUAGE plpgsql AS $$
DECLARE
    v_freed int;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('flowtrail-admission:' || p_tenant));
    DELETE FROM admission_slots s WHERE s.run_id = p_run;
    GET DIAGNOSTICS v_freed = ROW_COUNT;
    DELETE FROM admission_queue q WHERE q.run_id = p_run;
    IF v_freed = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT w.run_id, w.partition FROM (
            SELECT q.run_id, q.partition, q.flow_limit, row_number() OVER (ORDER BY q.arrival) AS pos
              FROM admission_queue q WHERE q.tenant_id = p_tenant AND q.flow_id = p_flow
        ) w
         WHERE w.pos + (SELECT count(*) FROM admission_slots s WHERE s.tenant_id = p_tenant AND s.flow_id = p_flow)
               <= w.flow_limit;
END $$;
