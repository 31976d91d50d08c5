-- The event store: the single source of truth. Everything else is rebuilt from it.

CREATE TABLE events (
    -- Identity order is NOT commit order: readers of the whole log order by
    -- (transaction_id, global_position) and stop below the oldest open transaction.
    global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id        uuid        NOT NULL UNIQUE,
    stream_id       uuid        NOT NULL,
    stream_type     text        NOT NULL,
    version         bigint      NOT NULL CHECK (version > 0),
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL DEFAULT 1,
    data            jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    -- Optimistic concurrency: two writers that read the same version cannot both append.
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version)
);

-- The global reader's scan: WHERE (transaction_id, global_position) > checkpoint ORDER BY the same.
CREATE INDEX events_commit_order_idx ON events (transaction_id, global_position);

-- Append-only: history is never rewritten. Erasure is by crypto-shredding, not DELETE.
CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the events table is append-only: % refused', TG_OP
        USING ERRCODE = 'raise_exception';
END;
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- Wake the relay once per appending statement; NOTIFY is delivered at commit,
-- so a listener never hears of an event it cannot read yet.
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ai_secretary_events', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify_on_append
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();

-- Write-side uniqueness that spans streams (e.g. one account per email). A row is
-- claimed in the same transaction as the stream's first events; the value is a
-- normalized key, never shown to anyone.
CREATE TABLE reservations (
    scope       text        NOT NULL,
    value       text        NOT NULL,
    stream_id   uuid        NOT NULL,
    reserved_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT reservations_pkey PRIMARY KEY (scope, value)
);

-- Idempotency-Key records: the first response to a keyed POST, written in the same
-- transaction as that command's events, so a retry can never append twice.
CREATE TABLE idempotency_keys (
    owner_id        uuid        NOT NULL, -- the caller; the nil uuid for anonymous requests
    key             text        NOT NULL,
    request_hash    bytea       NOT NULL, -- sha256 of method, path and body
    response_status smallint    NOT NULL,
    response_headers jsonb      NOT NULL,
    response_body   jsonb       NOT NULL,
    -- position of the command's last event, to re-issue X-Consistency-Token on replay
    transaction_id  bigint,
    global_position bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (owner_id, key)
);
