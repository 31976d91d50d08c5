-- What consumes the log, in SQLite (the embedded default): the tables that
-- migrations/postgres gives the relay, the projection workers, the replier and
-- the rebuilds (20261129000002_read_side.sql, 20261202000001_leases.sql,
-- 20261129050001_rebuilds.sql), with the same columns in SQLite's storage types
-- (uuid BLOB, timestamp INTEGER microseconds since 1970 UTC). Every value is
-- bound from Rust: no column defaults to a clock.

-- How far a consumer has got in commit order, and its fenced lease: `epoch`
-- counts takeovers, and every move is a compare-and-set on the epoch and the
-- position its writer started from (projections/src/checkpoint.rs).
CREATE TABLE checkpoints (
    name            TEXT    PRIMARY KEY,
    transaction_id  INTEGER NOT NULL DEFAULT 0,
    global_position INTEGER NOT NULL DEFAULT 0,
    events          INTEGER NOT NULL DEFAULT 0, -- applied since the row was created
    stream_sequence INTEGER NOT NULL DEFAULT 0, -- unused without a bus; kept for one shape
    updated_at      INTEGER NOT NULL,
    epoch           INTEGER NOT NULL DEFAULT 0,
    owner           TEXT,                       -- "<host>/<pid>"
    owner_since     INTEGER
) STRICT;

-- Events a projection could not decode: kept with the reason, never dropped silently.
CREATE TABLE dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    projection      TEXT    NOT NULL,
    event_id        BLOB,
    transaction_id  INTEGER,
    global_position INTEGER,
    subject         TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    recorded_at     INTEGER NOT NULL
) STRICT;

-- Rebuilds started through the admin API or `ai-secretary replay`.
CREATE TABLE rebuilds (
    id           BLOB    PRIMARY KEY,
    projection   TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    events       INTEGER NOT NULL DEFAULT 0, -- folded so far
    total_events INTEGER,                    -- below the head it folds up to
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    error        TEXT
) STRICT;

-- At most one running rebuild per projection.
CREATE UNIQUE INDEX rebuilds_one_running_idx ON rebuilds (projection) WHERE state = 'running';
