-- cairn's schema on PostgreSQL, version 3: what a running step says of its progress (SQLite's
-- version 9, `store/migrations/0009_progress.sql`, says what the column means).
ALTER TABLE tasks ADD COLUMN progress TEXT;
