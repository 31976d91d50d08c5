-- Rebuilds of read models started through the admin API: their state is kept
-- here so that any replica can answer GET /admin/rebuilds/{id} and show the
-- rebuild in progress in GET /admin/projections.
CREATE TABLE rebuilds (
    id           uuid        PRIMARY KEY,
    projection   text        NOT NULL,
    state        text        NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    events       bigint      NOT NULL DEFAULT 0, -- folded so far
    total_events bigint,                         -- below the head it folds up to
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    error        text
);

-- At most one running rebuild per projection (a row left 'running' by a crashed
-- process is marked failed when the next one finds no rebuild holding the lock).
CREATE UNIQUE INDEX rebuilds_one_running_idx ON rebuilds (projection) WHERE state = 'running';
