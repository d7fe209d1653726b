-- cairn's schema on PostgreSQL, version 2: who stopped an op, and the grace a cancel asks for
-- (SQLite's version 8, `store/migrations/0008_stops.sql`, says what each column means).
ALTER TABLE ops ADD COLUMN interrupted_by TEXT
    CHECK (interrupted_by IS NULL OR interrupted_by IN ('signal', 'shutdown', 'released'));
ALTER TABLE ops ADD COLUMN cancel_grace_ms BIGINT;
