-- How many times a rebuild has swapped fresh tables in (as
-- migrations/postgres/20261203000001_read_model_swaps.sql, which says why).
CREATE TABLE read_model_swaps (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL
) STRICT;
INSERT INTO read_model_swaps (id, generation) VALUES (1, 0);
