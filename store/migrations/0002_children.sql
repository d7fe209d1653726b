-- cairn's schema, version 2: sub-plans run as child ops, linked to the task that started them.

ALTER TABLE ops ADD COLUMN parent_id INTEGER REFERENCES ops(id);  -- the op whose `plan:` step this is
ALTER TABLE ops ADD COLUMN parent_task INTEGER;                   -- that step's (or item's) task_no
CREATE UNIQUE INDEX ops_by_parent ON ops (parent_id, parent_task) WHERE parent_id IS NOT NULL;
