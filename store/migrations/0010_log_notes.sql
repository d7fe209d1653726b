-- cairn's schema, version 10: a log over its limit keeps its head and its tail, and a note of
-- what was cut between them.
--
-- `stream` 0 is cairn's own line in a log: the note `[cairn: N bytes cut here; ...]`, numbered
-- between the head and the tail, written and updated only by the log rule (one per attempt).
--
-- The table becomes a rowid table. A WITHOUT ROWID table keeps each whole row in its primary
-- key's b-tree, and a search through a row larger than a page reads all of it to compare keys:
-- tens of KiB for each step of every search, and a chunk is up to 64 KiB.
CREATE TABLE logs_new (
    op_id    INTEGER NOT NULL,
    task_no  INTEGER NOT NULL,
    attempt  INTEGER NOT NULL,
    seq      INTEGER NOT NULL,
    stream   INTEGER NOT NULL CHECK (stream = 0 OR stream = 1 OR stream = 2),   -- 1 stdout, 2 stderr, 0 cairn's note
    at       INTEGER NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (op_id, task_no, attempt, seq)
);
INSERT INTO logs_new (op_id, task_no, attempt, seq, stream, at, data)
    SELECT op_id, task_no, attempt, seq, stream, at, data FROM logs;
DROP TABLE logs;
ALTER TABLE logs_new RENAME TO logs;
