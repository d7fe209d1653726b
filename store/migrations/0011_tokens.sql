-- cairn's schema, version 11: the tokens of the HTTP API (`cairn serve --http`).
--
-- A token is shown once, when it is made (`cairn token create`); only its SHA-256 (hex) is kept,
-- so that what this file holds cannot be used to call the API. `role`: `viewer` reads,
-- `operator` also acts. Revoking a token deletes its row.
CREATE TABLE tokens (
    name        TEXT PRIMARY KEY,
    role        TEXT NOT NULL CHECK (role IN ('viewer', 'operator')),
    hash        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL
) WITHOUT ROWID;
