-- The read models in SQLite (the embedded default): the tables the
-- projections declare (`Table` in projections/src/projections/<name>/mod.rs)
-- and migrations/postgres/20261129000002_read_side.sql makes on Postgres, in the
-- storage types the SQLite executor binds (`executor::sqlite::storage_type`):
--   uuid       BLOB of its 16 bytes
--   timestamp  INTEGER microseconds since 1970-01-01 UTC
--   date       TEXT YYYY-MM-DD
--   json       TEXT
--   text TEXT, i64 INTEGER, f64 REAL
-- Same columns, same order, same keys and NOT NULLs as on Postgres; STRICT, so
-- a value bound as the wrong type is refused rather than stored.
-- tests/api/read_models.rs checks these against the declarations and runs
-- every rule through the SQLite executor on them. Checkpoints, leases and dead
-- letters come with the worker that runs on SQLite.

CREATE TABLE assistants (
    id                 BLOB    PRIMARY KEY,
    owner_id           BLOB    NOT NULL,
    name               TEXT    NOT NULL,
    role               TEXT    NOT NULL,
    instructions       TEXT    NOT NULL,
    model              TEXT    NOT NULL,
    temperature        REAL    NOT NULL,
    metadata           TEXT    NOT NULL,
    status             TEXT    NOT NULL,
    conversation_count INTEGER NOT NULL DEFAULT 0,
    message_count      INTEGER NOT NULL DEFAULT 0,
    last_activity_at   INTEGER,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    version            INTEGER NOT NULL,
    last_tx            INTEGER NOT NULL,
    last_gp            INTEGER NOT NULL
) STRICT;

CREATE INDEX assistants_owner_idx ON assistants (owner_id, id);

CREATE TABLE assistants_conversations (
    conversation_id BLOB PRIMARY KEY,
    assistant_id    BLOB NOT NULL
) STRICT;

CREATE TABLE conversations (
    id                BLOB    PRIMARY KEY,
    owner_id          BLOB    NOT NULL,
    assistant_id      BLOB    NOT NULL,
    title             TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    message_count     INTEGER NOT NULL DEFAULT 0,
    last_message_at   INTEGER,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens      INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    version           INTEGER NOT NULL,
    last_tx           INTEGER NOT NULL,
    last_gp           INTEGER NOT NULL
) STRICT;

CREATE INDEX conversations_owner_idx ON conversations (owner_id, id);
CREATE INDEX conversations_owner_assistant_idx ON conversations (owner_id, assistant_id, id);

CREATE TABLE messages (
    id                BLOB    PRIMARY KEY,
    conversation_id   BLOB    NOT NULL,
    owner_id          BLOB    NOT NULL,
    seq               INTEGER NOT NULL,
    role              TEXT    NOT NULL,
    content           TEXT,
    status            TEXT    NOT NULL,
    reply_to          BLOB,
    model             TEXT,
    finish_reason     TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    total_tokens      INTEGER,
    error             TEXT,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
) STRICT;

CREATE UNIQUE INDEX messages_conversation_seq_idx ON messages (conversation_id, seq);

CREATE TABLE messages_conversations (
    conversation_id BLOB PRIMARY KEY,
    owner_id        BLOB NOT NULL
) STRICT;

CREATE TABLE usage_daily (
    owner_id          BLOB    NOT NULL,
    day               TEXT    NOT NULL,
    assistant_id      BLOB    NOT NULL,
    model             TEXT    NOT NULL,
    messages          INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (owner_id, day, assistant_id, model)
) STRICT;

CREATE TABLE usage_conversations (
    conversation_id BLOB PRIMARY KEY,
    owner_id        BLOB NOT NULL,
    assistant_id    BLOB NOT NULL
) STRICT;

CREATE TABLE cache_conversations (
    conversation_id BLOB PRIMARY KEY,
    assistant_id    BLOB NOT NULL
) STRICT;
