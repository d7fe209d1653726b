-- cairn's schema, version 13: how far a supervised attempt's (`adopt`) output files are in its
-- log, in bytes of stdout and stderr. Written in the transaction that adds the log chunks that
-- got them there, so that a reader taking the attempt again (after a kill, or a lost connection)
-- goes on from exactly the first byte not recorded: no line repeated, none lost. It replaces a
-- note in a file beside the attempt's, written after that commit.
ALTER TABLE attempts ADD COLUMN out_logged INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN err_logged INTEGER NOT NULL DEFAULT 0;
