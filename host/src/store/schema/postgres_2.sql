-- Cluster mode: one driver per rollout (a lease, and an epoch every write of the rollout
-- moves, checked by the next), the nodes alive, and the gate numbers each node publishes
-- for the rollouts in progress.
ALTER TABLE rollouts ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rollouts ADD COLUMN driver TEXT;
ALTER TABLE rollouts ADD COLUMN lease_until BIGINT NOT NULL DEFAULT 0;  -- database clock, ms
-- A node of the Kiln before this schema writes a rollout without moving its epoch: the
-- database moves it, so such a write fences newer drivers too (a rolling upgrade during a
-- rollout). Renewing a lease changes no rollout and moves nothing.
CREATE FUNCTION kiln_rollout_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.epoch = OLD.epoch AND NEW.rollout IS DISTINCT FROM OLD.rollout THEN
        NEW.epoch := OLD.epoch + 1;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER rollouts_epoch BEFORE UPDATE ON rollouts
    FOR EACH ROW EXECUTE FUNCTION kiln_rollout_epoch();
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
