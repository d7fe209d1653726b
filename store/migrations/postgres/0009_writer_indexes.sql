-- cairn's PostgreSQL schema, version 9: the writer's last reads that scanned a whole table find
-- their rows by index. Commit tokens are kept an hour, so a busy cluster holds millions, and the
-- prune every thousand commits read them all; an op's end reads the locks it holds. Under
-- SERIALIZABLE a scan of a whole table also locks the table against every other node's writes.
CREATE INDEX commit_tokens_by_age ON commit_tokens (at);
CREATE INDEX locks_by_op ON locks (op_id);
