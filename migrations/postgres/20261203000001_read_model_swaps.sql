-- How many times a rebuild has swapped fresh tables in. Every swap transaction
-- adds one (projections/src/rebuild.rs); a service whose cache lives in its own
-- process (no REDIS_URL) watches it and drops that cache when it moves, so a
-- `replay` run as a second process, which cannot reach that cache, is still
-- served by it no longer than one poll. One row, never deleted.
CREATE TABLE read_model_swaps (
    id         smallint PRIMARY KEY CHECK (id = 1),
    generation bigint   NOT NULL
);
INSERT INTO read_model_swaps (id, generation) VALUES (1, 0);
