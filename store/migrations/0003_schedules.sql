-- cairn's schema, version 3: cron schedules that `cairn serve` fires.

CREATE TABLE schedules (
    name        TEXT PRIMARY KEY,
    plan        TEXT NOT NULL,               -- the plan file (absolute), read when the schedule fires
    params      TEXT NOT NULL,               -- JSON object of `-p` values, as given
    cron        TEXT NOT NULL,               -- a 5-field crontab expression or `@daily`-style
    timezone    TEXT NOT NULL,
    paused      INTEGER NOT NULL DEFAULT 0,
    catch_up    INTEGER NOT NULL DEFAULT 1,  -- 1: firings missed while no serve ran fire once
    created_at  INTEGER NOT NULL,
    last_fire   INTEGER,                     -- the (scheduled) time of the last firing handled
    last_op     INTEGER REFERENCES ops(id),  -- the op the last firing submitted
    note        TEXT                         -- what happened at the last firing handled
) WITHOUT ROWID;
