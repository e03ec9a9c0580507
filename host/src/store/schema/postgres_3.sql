-- Secrets every node of a cluster shares, made once by whichever node needs one first:
-- `sticky` salts the sticky-session hash, so callers cannot choose keys that land on a
-- version of their choice.
CREATE TABLE secrets (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
