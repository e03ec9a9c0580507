-- Model monitors' time buckets as each process published them (JSON counts per bin and
-- class; no payloads), read by every node's drift answers and rollout gates; and the
-- references windows made (POST .../reference), and the bins of monitors deployed without
-- a reference file (set from the first rows, the same on every node). See
-- store/meta/monitor.rs.
CREATE TABLE monitor_buckets (
    function    TEXT NOT NULL,
    version     BIGINT NOT NULL,
    model       TEXT NOT NULL,
    span_ms     BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    process     TEXT NOT NULL,
    counts      TEXT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (function, version, model, span_ms, at, process)
);
CREATE INDEX monitor_buckets_updated ON monitor_buckets (updated_at);
CREATE TABLE monitor_references (
    function    TEXT NOT NULL,
    version     BIGINT NOT NULL,
    model       TEXT NOT NULL,
    counts      TEXT NOT NULL,
    window_ms   BIGINT NOT NULL,
    set_ms      BIGINT NOT NULL,
    set_by      TEXT NOT NULL,
    PRIMARY KEY (function, version, model)
);
CREATE TABLE monitor_profiles (
    function    TEXT NOT NULL,
    version     BIGINT NOT NULL,
    model       TEXT NOT NULL,
    profile     TEXT NOT NULL,
    made_ms     BIGINT NOT NULL,
    PRIMARY KEY (function, version, model)
);
