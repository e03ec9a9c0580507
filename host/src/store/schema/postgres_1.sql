-- Kiln's schema version 1 on PostgreSQL: the tables of kiln.db (functions and their
-- immutable versions, traffic policies, aliases, history, rollouts, blob owners, API keys),
-- of audit.db and of usage.db, shared by every node of a cluster.
CREATE TABLE functions (
    name        TEXT PRIMARY KEY,
    created_at  BIGINT NOT NULL,
    tenant      TEXT NOT NULL DEFAULT 'default',
    public      BOOLEAN NOT NULL DEFAULT false
);
-- The traffic policy of each function that has one (JSON TrafficPolicy, or 'null').
CREATE TABLE traffic (
    function    TEXT PRIMARY KEY REFERENCES functions(name) ON DELETE CASCADE,
    policy      TEXT NOT NULL,
    revision    BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
-- Named policies of each function; a removed alias keeps its row with the policy 'null'.
CREATE TABLE aliases (
    function    TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    alias       TEXT NOT NULL,
    policy      TEXT NOT NULL,
    revision    BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (function, alias)
);
-- Every traffic change, rollout step and rollback, by function; outlives the function.
CREATE TABLE history (
    seq         BIGSERIAL PRIMARY KEY,
    function    TEXT NOT NULL,
    at_ms       BIGINT NOT NULL,
    actor       TEXT,
    kind        TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    detail      TEXT NOT NULL DEFAULT '{}',
    tenant      TEXT
);
CREATE INDEX history_function ON history (function, seq);
-- The latest progressive rollout of each function (JSON Rollout), active or ended.
CREATE TABLE rollouts (
    function    TEXT PRIMARY KEY,
    rollout     TEXT NOT NULL,
    active      BOOLEAN NOT NULL,
    updated_at  BIGINT NOT NULL
);
-- Which tenants uploaded each blob.
CREATE TABLE blob_owners (
    digest      TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    PRIMARY KEY (digest, tenant)
);
-- Outlives its function: numbers and the last signed deploy are never reused.
CREATE TABLE version_seq (
    function        TEXT PRIMARY KEY,
    last            BIGINT NOT NULL,
    last_signed_at  BIGINT
);
CREATE TABLE versions (
    id              BIGSERIAL PRIMARY KEY,
    function        TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    version         BIGINT NOT NULL,
    digest          TEXT NOT NULL,
    size            BIGINT NOT NULL,
    timeout_ms      BIGINT NOT NULL,
    memory_mb       BIGINT NOT NULL,
    max_concurrency BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    nn              TEXT NOT NULL DEFAULT '{}',
    cache           TEXT NOT NULL DEFAULT '{}',
    rate            TEXT,
    signer          TEXT,
    outbound        TEXT NOT NULL DEFAULT '[]',
    UNIQUE (function, version)
);
-- API keys (hashed; see auth/key_store.rs).
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    hash        BYTEA NOT NULL UNIQUE,
    tenant      TEXT NOT NULL,
    scopes      TEXT NOT NULL,
    rate        TEXT,
    created_at  BIGINT NOT NULL,
    created_by  TEXT,
    revoked_at  BIGINT
);
-- The audit log: append-only (a trigger refuses UPDATE, DELETE and TRUNCATE).
CREATE TABLE audit (
    seq             BIGSERIAL PRIMARY KEY,
    at_ms           BIGINT NOT NULL,
    key_id          TEXT,
    tenant          TEXT,
    subject_tenant  TEXT,
    action          TEXT NOT NULL,
    target          TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    status          INTEGER NOT NULL,
    detail          TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_at ON audit (at_ms);
CREATE INDEX audit_tenant ON audit (tenant, seq);
CREATE INDEX audit_subject ON audit (subject_tenant, seq);
CREATE INDEX audit_action ON audit (action, seq);
CREATE FUNCTION kiln_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$$;
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION kiln_audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION kiln_audit_append_only();
-- The usage ledger: one row per request answered by any node (see meter/ledger.rs).
CREATE TABLE usage (
    request_id        TEXT NOT NULL,
    tenant            TEXT NOT NULL,
    function          TEXT NOT NULL,
    version           BIGINT NOT NULL,
    start_ms          BIGINT NOT NULL,
    wall_us           BIGINT NOT NULL,
    cpu_us            BIGINT NOT NULL,
    memory_peak_bytes BIGINT NOT NULL,
    mem_mib_ms        BIGINT NOT NULL,
    inference_cpu_us  BIGINT NOT NULL,
    inference_gpu_us  BIGINT NOT NULL,
    bytes_in          BIGINT NOT NULL,
    bytes_out         BIGINT NOT NULL,
    cold              BIGINT NOT NULL,
    cache             TEXT NOT NULL,
    outcome           TEXT NOT NULL,
    status            BIGINT NOT NULL,
    cost              BIGINT NOT NULL,
    PRIMARY KEY (start_ms, request_id)
);
-- One counter every change bumps as the last step of its transaction: the row lock orders
-- the bumps as the commits, so a node that polls it never misses a committed change.
CREATE TABLE kiln_changes (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    n   BIGINT NOT NULL
);
INSERT INTO kiln_changes (id, n) VALUES (1, 0);
