-- The read side: tables owned by the projections (rebuildable from the events
-- table at any time), their checkpoints, and the events they could not read.

-- Where each consumer of the log has got to, in commit order. The relay and
-- every projection keep one row; a projection writes its row in the same
-- transaction as its read-model changes.
CREATE TABLE checkpoints (
    name            text        PRIMARY KEY,
    transaction_id  bigint      NOT NULL DEFAULT 0,
    global_position bigint      NOT NULL DEFAULT 0,
    events          bigint      NOT NULL DEFAULT 0, -- applied since the row was created
    -- The JetStream sequence of the last message a projection consumed: where its
    -- consumer resumes (the bus may redeliver, but never out of this order).
    stream_sequence bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Events a projection could not decode: kept with the reason, never dropped silently.
CREATE TABLE dead_letters (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection      text        NOT NULL,
    event_id        uuid,
    transaction_id  bigint,
    global_position bigint,
    subject         text        NOT NULL,
    reason          text        NOT NULL,
    payload         text        NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);

-- Projection `assistants`. last_* is the position of the last event applied to the
-- row: the cache only keeps a copy at least that new.
CREATE TABLE assistants (
    id                 uuid        PRIMARY KEY,
    owner_id           uuid        NOT NULL,
    name               text        NOT NULL,
    role               text        NOT NULL,
    instructions       text        NOT NULL,
    model              text        NOT NULL,
    temperature        float8      NOT NULL,
    metadata           jsonb       NOT NULL,
    status             text        NOT NULL,
    conversation_count bigint      NOT NULL DEFAULT 0,
    message_count      bigint      NOT NULL DEFAULT 0,
    last_activity_at   timestamptz,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    version            bigint      NOT NULL,
    last_tx            bigint      NOT NULL,
    last_gp            bigint      NOT NULL
);
CREATE INDEX assistants_owner_idx ON assistants (owner_id, id);

-- Which assistant a conversation belongs to, for counting its messages.
CREATE TABLE assistants_conversations (
    conversation_id uuid PRIMARY KEY,
    assistant_id    uuid NOT NULL
);

-- Projection `conversations`.
CREATE TABLE conversations (
    id                uuid        PRIMARY KEY,
    owner_id          uuid        NOT NULL,
    assistant_id      uuid        NOT NULL,
    title             text        NOT NULL,
    status            text        NOT NULL,
    message_count     bigint      NOT NULL DEFAULT 0,
    last_message_at   timestamptz,
    prompt_tokens     bigint      NOT NULL DEFAULT 0,
    completion_tokens bigint      NOT NULL DEFAULT 0,
    total_tokens      bigint      NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    version           bigint      NOT NULL,
    last_tx           bigint      NOT NULL,
    last_gp           bigint      NOT NULL
);
CREATE INDEX conversations_owner_idx ON conversations (owner_id, id);
CREATE INDEX conversations_owner_assistant_idx ON conversations (owner_id, assistant_id, id);

-- Projection `messages`: user messages and replies, ordered by their event's
-- version in the conversation stream (seq).
CREATE TABLE messages (
    id                uuid        PRIMARY KEY,
    conversation_id   uuid        NOT NULL,
    owner_id          uuid        NOT NULL,
    seq               bigint      NOT NULL,
    role              text        NOT NULL,
    content           text,
    status            text        NOT NULL,
    reply_to          uuid,
    model             text,
    finish_reason     text,
    prompt_tokens     bigint,
    completion_tokens bigint,
    total_tokens      bigint,
    error             text,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL
);
CREATE UNIQUE INDEX messages_conversation_seq_idx ON messages (conversation_id, seq);

CREATE TABLE messages_conversations (
    conversation_id uuid PRIMARY KEY,
    owner_id        uuid NOT NULL
);

-- Projection `usage_daily`: completed replies and their tokens per owner, UTC day,
-- assistant and model.
CREATE TABLE usage_daily (
    owner_id          uuid   NOT NULL,
    day               date   NOT NULL,
    assistant_id      uuid   NOT NULL,
    model             text   NOT NULL,
    messages          bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    total_tokens      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (owner_id, day, assistant_id, model)
);

CREATE TABLE usage_conversations (
    conversation_id uuid PRIMARY KEY,
    owner_id        uuid NOT NULL,
    assistant_id    uuid NOT NULL
);

-- Projection `cache` keeps its lookups here (the values themselves live in Redis).
CREATE TABLE cache_conversations (
    conversation_id uuid PRIMARY KEY,
    assistant_id    uuid NOT NULL
);
