-- cairn's schema, version 8: who stopped an op, and the grace a cancel asks for.
--
-- `interrupted_by` says why an op stored `interrupted` was stopped, as its owner wrote it when it
-- stopped: `signal` (Ctrl-C, SIGHUP or SIGTERM to a `cairn run` or `cairn resume`), `shutdown` (a
-- `cairn serve` drained as it stopped), `released` (a `cairn serve` let go of an op it could not
-- carry on). A dead owner writes nothing: an op stored `running` whose owner is gone is the
-- derived case (`owner-died`). NULL on an op interrupted before this version: not known.
-- `cairn serve` resumes by itself only ops whose owner died, was drained or released: never one
-- a person stopped.
--
-- `cancel_grace_ms` is `cairn cancel --grace`: how long the op's running steps get between TERM
-- and KILL, kept with the cancel request so that the owner (another process) uses it. NULL: the
-- owner's own `--grace`.
ALTER TABLE ops ADD COLUMN interrupted_by TEXT
    CHECK (interrupted_by IS NULL OR interrupted_by = 'signal' OR interrupted_by = 'shutdown' OR interrupted_by = 'released');
ALTER TABLE ops ADD COLUMN cancel_grace_ms INTEGER;
