-- cairn's schema, version 7: the `cairn serve` processes that share this database.
--
-- Each serving process records itself here and renews its row as it renews its ops' leases; a
-- row whose lease ran out is a node that is gone (`cairn nodes` leaves it out, and the next
-- node to renew deletes it). What a node runs is not kept here: it is the ops it owns.
CREATE TABLE nodes (
    host          TEXT NOT NULL,          -- for people: where it runs
    boot_id       TEXT NOT NULL,          -- `<boot id>/<pid namespace>`, as `ops.owner_boot`
    pid           INTEGER NOT NULL,
    start         INTEGER NOT NULL,       -- the process's start time (clock ticks since boot)
    workers       INTEGER NOT NULL,       -- ops it runs at once
    started_at    INTEGER NOT NULL,
    heartbeat_at  INTEGER NOT NULL,
    lease_until   INTEGER NOT NULL,
    PRIMARY KEY (boot_id, pid, start)
) WITHOUT ROWID;
