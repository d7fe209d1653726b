-- cairn's schema on PostgreSQL, version 5: the tokens of the HTTP API (SQLite's version 11,
-- `store/migrations/0011_tokens.sql`). Only a token's SHA-256 (hex) is kept.
CREATE TABLE tokens (
    name        TEXT PRIMARY KEY,
    role        TEXT NOT NULL CHECK (role IN ('viewer', 'operator')),
    hash        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL
);
