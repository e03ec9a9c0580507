-- Cluster mode: one driver per rollout (a lease, and an epoch every write of the rollout
-- moves, checked by the next), the nodes alive, and the gate numbers each node publishes
-- for the rollouts in progress.
ALTER TABLE rollouts ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rollouts ADD COLUMN driver TEXT;
ALTER TABLE rollouts ADD COLUMN lease_until BIGINT NOT NULL DEFAULT 0;  -- database clock, ms
-- Every node's heartbeat (database clock, ms) and what it reports of itself.
CREATE TABLE nodes (
    id           TEXT PRIMARY KEY,
    address      TEXT NOT NULL,
    version      TEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    loaded       TEXT NOT NULL DEFAULT '[]',  -- JSON ["function@version", ...]
    in_flight    BIGINT NOT NULL DEFAULT 0
);
-- One process's numbers of one version over the current step of its function's rollout
-- (JSON mergeable aggregate): the driver adds up every node's.
CREATE TABLE rollout_stats (
    function     TEXT NOT NULL,
    process      TEXT NOT NULL,               -- node id and its start
    version      BIGINT NOT NULL,
    step_started BIGINT NOT NULL,
    stats        TEXT NOT NULL,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (function, process, version)
);
