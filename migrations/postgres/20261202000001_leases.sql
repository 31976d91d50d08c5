-- Single-active roles (the relay, each projection worker) hold their checkpoint
-- row as a fenced lease. Taking over bumps `epoch`; every checkpoint write is a
-- compare-and-set on the epoch (and position) its writer started from, so a
-- deposed owner's write matches no row and it stops instead of overwriting.
ALTER TABLE checkpoints
    ADD COLUMN epoch       bigint      NOT NULL DEFAULT 0,
    -- Who holds it now ("<host>/<pid>"), and since when: shown in /admin/projections.
    ADD COLUMN owner       text,
    ADD COLUMN owner_since timestamptz;
