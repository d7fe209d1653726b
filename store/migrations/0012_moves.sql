-- cairn's schema, version 12: which ops moved, in the order their changes committed.
--
-- A transaction that records an op's events also appends the op here, so that a follower of
-- changes (the HTTP API's `/api/v1/changes`) reads what was appended since its last look instead
-- of every op. SQLite commits one transaction at a time, so `tick` grows in commit order. Only
-- the newest rows are kept; a follower that fell further behind reads everything again.
CREATE TABLE moves (
    tick   INTEGER PRIMARY KEY,
    op_id  INTEGER NOT NULL
);
