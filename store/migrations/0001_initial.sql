-- cairn's schema, version 1. Never edit a migration that has shipped: add the next one.
-- Times are integer milliseconds since the Unix epoch (UTC).

-- The plan text an op runs, with the sub-plans it names: content-addressed, kept forever.
CREATE TABLE plan_snapshots (
    id      INTEGER PRIMARY KEY,
    hash    TEXT NOT NULL UNIQUE,        -- `sha256:<hex>` of the bundle
    name    TEXT NOT NULL,               -- the plan's `name`
    text    TEXT NOT NULL,               -- the plan file as submitted
    files   TEXT NOT NULL DEFAULT '{}'   -- JSON object: sub-plan path -> text
);

-- One execution of a plan with concrete parameters.
CREATE TABLE ops (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,  -- the small id people use; never reused
    uuid         TEXT NOT NULL UNIQUE,   -- UUID v7, for machines
    plan         TEXT NOT NULL,          -- the plan's name: the TYPE column
    snapshot_id  INTEGER NOT NULL REFERENCES plan_snapshots(id),
    title        TEXT NOT NULL,          -- the NAME column
    status       TEXT NOT NULL CHECK (status IN
                   ('queued','running','waiting','succeeded','failed','canceling','canceled','interrupted')),
    params       TEXT NOT NULL,          -- JSON object; secret values are encrypted, never in clear
    workdir      TEXT NOT NULL,          -- the plan file's directory: steps run there, resumes too
    env          TEXT NOT NULL,          -- JSON object: the base environment captured at submit
    created_at   INTEGER NOT NULL,
    started_at   INTEGER,
    ended_at     INTEGER,
    -- The owner: the process running the op, and until when its lease holds. All NULL when none.
    owner_host   TEXT,
    owner_boot   TEXT,                   -- `<boot id>/<pid namespace>`: another boot means it is dead
    owner_pid    INTEGER,
    owner_start  INTEGER,                -- the owner's process start time (clock ticks since boot)
    lease_until  INTEGER,
    current_task TEXT,                   -- the CUR_TASK column
    error        TEXT,                   -- why the op failed or stopped
    lock_key     TEXT,                   -- the rendered `lock`: ops with equal keys never run at once
    cooldown_ms  INTEGER,                -- the plan's `cooldown`, applied to the key when the op ends
    ending       TEXT,                   -- JSON: the outcome decided before the finishing hooks run
    cancel_requested_at INTEGER,         -- set by `cairn cancel`; the owner acts on it
    cancel_by    TEXT,
    cancel_reason TEXT,
    event_seq    INTEGER NOT NULL DEFAULT 0  -- the seq of the op's last event
);
CREATE INDEX ops_by_status ON ops (status, id);
CREATE INDEX ops_by_plan ON ops (plan, id);

-- One node of an op's DAG: a step, or one item of a fan-out.
CREATE TABLE tasks (
    op_id       INTEGER NOT NULL REFERENCES ops(id),
    task_no     INTEGER NOT NULL,        -- a step's task_no is its index in the plan
    step        TEXT NOT NULL,           -- the step's id
    name        TEXT NOT NULL,           -- `restore[shard-3]`, or the step's id
    item        TEXT,                    -- JSON of the fan-out item, NULL for a step
    status      TEXT NOT NULL CHECK (status IN
                  ('pending','running','waiting','succeeded','failed','skipped','canceled')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    retry_from  INTEGER NOT NULL DEFAULT 0,  -- attempts before the current retry round began
    started_at  INTEGER,
    ended_at    INTEGER,
    exit_code   INTEGER,
    error       TEXT,
    outputs     TEXT,                    -- JSON object of the outputs the task published
    by_check    INTEGER NOT NULL DEFAULT 0,  -- 1: succeeded because its `check` said it was done
    PRIMARY KEY (op_id, task_no)
) WITHOUT ROWID;

-- One try of a task, with what a resume needs to find a process it left behind.
CREATE TABLE attempts (
    op_id       INTEGER NOT NULL,
    task_no     INTEGER NOT NULL,
    n           INTEGER NOT NULL,        -- 1, 2, ...
    status      TEXT NOT NULL CHECK (status IN ('running','succeeded','failed','interrupted','canceled')),
    started_at  INTEGER NOT NULL,
    ended_at    INTEGER,
    exit_code   INTEGER,
    error       TEXT,
    host        TEXT,
    boot_id     TEXT,
    pid         INTEGER,
    pgid        INTEGER,
    proc_start  INTEGER,                 -- the process's start time (clock ticks since boot)
    PRIMARY KEY (op_id, task_no, n),
    FOREIGN KEY (op_id, task_no) REFERENCES tasks (op_id, task_no)
) WITHOUT ROWID;

-- What steps printed, in chunks, per attempt; capped per attempt, keeping the tail.
CREATE TABLE logs (
    op_id    INTEGER NOT NULL,
    task_no  INTEGER NOT NULL,
    attempt  INTEGER NOT NULL,
    seq      INTEGER NOT NULL,
    stream   INTEGER NOT NULL CHECK (stream IN (1, 2)),   -- 1 stdout, 2 stderr
    at       INTEGER NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (op_id, task_no, attempt, seq)
) WITHOUT ROWID;

-- Lock keys and the op that holds each. A key is taken when its op starts running and released
-- when the op succeeds or is canceled; a failed or interrupted op keeps it (its target is half-done).
CREATE TABLE locks (
    key     TEXT PRIMARY KEY,
    op_id   INTEGER NOT NULL REFERENCES ops(id),
    since   INTEGER NOT NULL
) WITHOUT ROWID;

-- Anti-flapping: after an op on a key ends, a new op on the key is refused until `until`, unless
-- someone acknowledges it (`cairn ack KEY`).
CREATE TABLE cooldowns (
    key       TEXT PRIMARY KEY,
    op_id     INTEGER NOT NULL REFERENCES ops(id),  -- the op whose end started it
    until     INTEGER NOT NULL,
    acked_by  TEXT,
    acked_at  INTEGER
) WITHOUT ROWID;

-- Switches: `paused` holds JSON {by, at, reason} while no new op may start.
CREATE TABLE settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
) WITHOUT ROWID;

-- The audit trail: every state change of an op and its tasks, append-only, written in the same
-- transaction as the change.
CREATE TABLE events (
    op_id    INTEGER NOT NULL REFERENCES ops(id),
    seq      INTEGER NOT NULL,
    at       INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    task     TEXT,                       -- the task's name, or NULL for the op
    message  TEXT NOT NULL,
    PRIMARY KEY (op_id, seq)
) WITHOUT ROWID;
