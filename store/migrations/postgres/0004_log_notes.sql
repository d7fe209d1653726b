-- cairn's schema on PostgreSQL, version 4: `stream` 0 is cairn's own note in a log, of what was
-- cut between its head and its tail (SQLite's version 10, `store/migrations/0010_log_notes.sql`).
ALTER TABLE logs DROP CONSTRAINT logs_stream_check;
ALTER TABLE logs ADD CONSTRAINT logs_stream_check CHECK (stream IN (0, 1, 2));
