-- cairn's schema on PostgreSQL, version 3: `stream` 0 is cairn's own note in a log, of what was
-- cut between its head and its tail (SQLite's version 9, `store/migrations/0009_log_notes.sql`).
ALTER TABLE logs DROP CONSTRAINT logs_stream_check;
ALTER TABLE logs ADD CONSTRAINT logs_stream_check CHECK (stream IN (0, 1, 2));
