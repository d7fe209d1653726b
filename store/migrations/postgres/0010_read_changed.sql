-- cairn's PostgreSQL schema, version 10: what the writer's guards raise when a row that a
-- transaction took as read, from an earlier transaction's read, has changed since
-- (`store/src/postgres/tx.rs`, `Known`): the transaction is then aborted and runs again, reading.
-- VOLATILE (the default), so that a guard's COALESCE calls it only when the row is not as known.
CREATE FUNCTION cairn_read_changed() RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'a row this transaction took as read has changed' USING ERRCODE = 'CA001';
END
$$;
