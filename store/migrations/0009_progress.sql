-- cairn's schema, version 9: what a running step says of its progress.
--
-- `progress` is the last line a step's process wrote to `$CAIRN_PROGRESS` (`45`, `45/100`, with
-- text after it: `45/100 restoring table x`), as the process's owner last read it; shown beside
-- the task in `status`, `show` and `--json`. Kept when the task ends (the last thing it said),
-- cleared when an attempt starts. NULL: the step said nothing.
ALTER TABLE tasks ADD COLUMN progress TEXT;
