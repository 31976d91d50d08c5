-- The event store in SQLite (the embedded default): the same tables as the
-- event store's part of migrations/postgres, in SQLite's types. Why these types
-- and pragmas: docs/decisions.md, "SQLite event store". The read models' tables
-- come in later migrations of this folder.
--
-- Every table is STRICT: a value of the wrong type is refused instead of being
-- stored as whatever it happens to be. Types used throughout:
--   uuid       BLOB of its 16 bytes (what sqlx binds for a Uuid, so a bound id
--              always compares equal; byte order is Postgres' uuid order)
--   timestamp  INTEGER microseconds since 1970-01-01 UTC (Postgres' precision;
--              compares and sorts as numbers; every chrono date fits)
--   json       TEXT, checked with json_valid (read back as written)

CREATE TABLE events (
    -- AUTOINCREMENT: a position once committed is never handed out again (the
    -- next one is always above every position that has ever existed). A
    -- rolled-back insert gives its number back, but nobody could see it.
    global_position INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The first global_position of the commit that wrote the row: the events of
    -- one transaction share it. One writer at a time (BEGIN IMMEDIATE), so
    -- commits are serialized and global_position order IS commit order; with
    -- transaction_id <= global_position, (transaction_id, global_position)
    -- orders exactly as global_position does, and no reader needs a horizon.
    -- No default: the store sets it (src/store/sqlite.rs, `next_position`).
    transaction_id  INTEGER NOT NULL,
    event_id        BLOB    NOT NULL UNIQUE CHECK (length(event_id) = 16),
    stream_id       BLOB    NOT NULL CHECK (length(stream_id) = 16),
    stream_type     TEXT    NOT NULL,
    version         INTEGER NOT NULL CHECK (version > 0),
    event_type      TEXT    NOT NULL,
    schema_version  INTEGER NOT NULL DEFAULT 1,
    data            TEXT    NOT NULL CHECK (json_valid(data)),
    metadata        TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    recorded_at     INTEGER NOT NULL,
    -- Optimistic concurrency: two writers that read the same version cannot both append.
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version)
) STRICT;

-- A conversation's live feed reads its replies' events by the conversation
-- their payload names; only reply rows are in the index.
CREATE INDEX events_reply_conversation_idx
    ON events (data ->> 'conversation_id', global_position)
    WHERE stream_type = 'reply';

-- Append-only: history is never rewritten. Erasure is by crypto-shredding, not
-- DELETE. (A DELETE without WHERE meets the trigger too: SQLite's truncate
-- shortcut is off on a table with a delete trigger.)
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'the events table is append-only: UPDATE refused');
END;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'the events table is append-only: DELETE refused');
END;

-- Write-side uniqueness that spans streams (one account per email), claimed in
-- the same transaction as the stream's first events.
CREATE TABLE reservations (
    scope       TEXT    NOT NULL,
    value       TEXT    NOT NULL,
    stream_id   BLOB    NOT NULL,
    reserved_at INTEGER NOT NULL,
    PRIMARY KEY (scope, value)
) STRICT;
-- Forgetting a user deletes the reservations of their stream.
CREATE INDEX reservations_stream_idx ON reservations (stream_id);

-- Idempotency-Key records: the first response to a keyed POST, written in the
-- same transaction as that command's events. Expired keys are as good as absent.
CREATE TABLE idempotency_keys (
    owner_id         BLOB    NOT NULL, -- the caller; the nil uuid for anonymous requests
    key              TEXT    NOT NULL,
    request_hash     BLOB    NOT NULL, -- sha256 of method, path and body
    response_status  INTEGER NOT NULL,
    response_headers TEXT    NOT NULL CHECK (json_valid(response_headers)),
    response_body    TEXT    NOT NULL CHECK (json_valid(response_body)),
    -- position of the command's last event, to re-issue X-Consistency-Token on replay
    transaction_id   INTEGER,
    global_position  INTEGER,
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    PRIMARY KEY (owner_id, key)
) STRICT;
CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);

-- Crypto-shredding: each user's data key, wrapped under ENCRYPTION_KEY. Inserted
-- with the user's UserRegistered, deleted with their UserForgotten (the
-- connection's secure_delete overwrites the deleted bytes).
CREATE TABLE user_keys (
    user_id    BLOB    PRIMARY KEY,
    wrapped    BLOB    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
