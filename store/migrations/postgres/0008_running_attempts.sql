-- cairn's PostgreSQL schema, version 8: the attempts left `running`, found without reading an
-- op's other attempts. A take-over reads them before its first task starts, and an op of a
-- million items has a million attempts.
CREATE INDEX attempts_running ON attempts (op_id, task_no, n) WHERE status = 'running';
