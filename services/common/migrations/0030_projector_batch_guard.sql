-- Opens a projector batch in the statement that follows its BEGIN (services/projector/adapters/store.py): the swap
-- lock held shared, then the check that the schema under the batch's name is still the one the projector connected
-- to (a rebuild's swap holds the lock exclusively and replaces the schema, docs/projector.md). A volatile function
-- reads with a new snapshot per statement, so the check sees a swap that committed while the lock was awaited.
CREATE FUNCTION projector_batch_guard(lock_key text, schema_name name, expected oid) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext(lock_key));
    IF (SELECT oid FROM pg_namespace WHERE nspname = schema_name) IS DISTINCT FROM expected THEN
        RAISE EXCEPTION 'schema % was replaced by a rebuild', schema_name USING ERRCODE = 'FT001';
    END IF;
END
$$;
