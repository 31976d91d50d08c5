-- Idempotency keys expire (IDEMPOTENCY_KEY_TTL_SECONDS, a day by default): an
-- expired key is as good as absent (a new request with it runs afresh and takes
-- the key over), and a cleanup job deletes expired rows. Rows kept before this
-- migration get a day from now.
ALTER TABLE idempotency_keys
    ADD COLUMN expires_at timestamptz NOT NULL DEFAULT now() + interval '24 hours';
CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
