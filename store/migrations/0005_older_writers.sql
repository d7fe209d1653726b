-- cairn's schema, version 5: an older cairn still running stops writing, cleanly.
--
-- From version 4 an event's seq is the op's last seq plus one, read from the events' key. A cairn
-- of version 3 or older, already running when a newer one migrated the file (a `serve` left up
-- across an upgrade), still numbers events by `ops.event_seq + 1`, which is no longer kept: its
-- next event would take a seq that is already used, and its transaction would fail with a bare
-- UNIQUE error; or, on an op no newer cairn has touched, succeed, then collide with a newer
-- cairn's event later. Only those older cairns ever write `ops.event_seq`, so every such write is
-- refused here with a message that says what to do. The refused transaction changes nothing: to
-- the older cairn it is as if it had been killed at that moment (a completion it could not record
-- reruns that step on resume, as after any crash), and the op is resumed by the new binary.
CREATE TRIGGER ops_event_seq_is_retired
BEFORE UPDATE OF event_seq ON ops
BEGIN
    SELECT RAISE(ABORT, 'this database was upgraded by a newer cairn (schema version 5): stop this cairn and run the new one; `cairn resume` takes over its ops');
END;
