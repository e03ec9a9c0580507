-- Model monitoring: what each request predicted (a class label from its model's output, or
-- the guest's x-kiln-prediction header), and the ground truth posted for it later, once
-- per request (see meter/feedback.rs). Feedback finds its request by id.
ALTER TABLE usage ADD COLUMN prediction TEXT;
CREATE INDEX usage_request_id ON usage (request_id);
CREATE TABLE feedback (
    request_id  TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    function    TEXT NOT NULL,
    version     BIGINT NOT NULL,
    start_ms    BIGINT NOT NULL,
    label       TEXT,
    value       TEXT,
    received_ms BIGINT NOT NULL
);
CREATE INDEX feedback_version ON feedback (function, version, start_ms);
-- A version's [validate] settings and what its cases got at deploy (JSON; NULL: none).
ALTER TABLE versions ADD COLUMN validation TEXT;
-- Monthly cost budgets per tenant, and the thresholds each crossed per month (an alert
-- is sent once per crossing, cluster-wide: see meter/budgets.rs).
CREATE TABLE budgets (
    tenant      TEXT PRIMARY KEY,
    monthly     BIGINT NOT NULL,
    alert_at    TEXT NOT NULL,
    hard        BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL
);
CREATE TABLE budget_alerts (
    tenant      TEXT NOT NULL,
    month       TEXT NOT NULL,
    percent     BIGINT NOT NULL,
    at_ms       BIGINT NOT NULL,
    PRIMARY KEY (tenant, month, percent)
);
