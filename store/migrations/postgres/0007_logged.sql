-- cairn's schema on PostgreSQL, version 7 (SQLite's version 13, `0013_logged.sql`): how far a
-- supervised attempt's output files are in its log, written with the log chunks that got them
-- there.
ALTER TABLE attempts
    ADD COLUMN out_logged BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN err_logged BIGINT NOT NULL DEFAULT 0;
