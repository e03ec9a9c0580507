-- The first answer to each Idempotency-Key, shared by every node so a retry that lands on
-- another node is answered the same (store/meta/idempotency.rs). `status` is NULL while
-- the first request runs; rows are dropped a day after they were made.
CREATE TABLE idempotency (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    status      INTEGER,
    location    TEXT,
    body        BYTEA,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_created ON idempotency (created_ms);
