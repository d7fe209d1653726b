-- cairn's schema on PostgreSQL, version 6: a transaction that records an op's events notifies
-- the op's id on the channel `cairn_moves` (SQLite's version 12, `0012_moves.sql`, logs it in a
-- table instead), which the followers of `/api/v1/changes` hear. No table changes; the version
-- goes up so that an older cairn, which does not notify, refuses this database instead of
-- writing changes that no follower is told of.
COMMENT ON TABLE events IS 'an insert notifies cairn_moves with its op id';
