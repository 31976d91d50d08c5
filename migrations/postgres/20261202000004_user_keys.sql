-- Crypto-shredding: each user's data key, wrapped (encrypted) under a key derived
-- from ENCRYPTION_KEY with the user's id as associated data. Personal fields of
-- events are sealed with it (docs/events.md). A row is inserted in the same
-- transaction as the user's UserRegistered event and deleted in the same
-- transaction as their UserForgotten: once it is gone, what was theirs in the
-- events table (which is never changed), on the bus and in every backup of
-- either is unreadable.
CREATE TABLE user_keys (
    user_id    uuid        PRIMARY KEY,
    wrapped    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
