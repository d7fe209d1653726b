-- cairn's schema, version 4: the columns every write checks, apart from the op's params.
--
-- Every change an owner makes first checks that it still owns the op (the fence). An op's
-- `params` may be large (a list of 100,000 partitions to fan out over) and the owner columns come
-- after it in the row: reading them from the table walks the params' overflow pages each time.
-- This covering index holds them on their own.
CREATE INDEX ops_owner ON ops (id, status, owner_host, owner_boot, owner_pid, owner_start, lease_until);

-- `ops.event_seq` is no longer kept: an event's seq is the op's last seq plus one, read from the
-- events' own key, so that recording an event does not rewrite the op's row (and its params).
