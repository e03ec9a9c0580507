-- Variables (kiln vars): what each version declares, and the values set on each function,
-- for every request (scope '') or for the requests through one alias; a secret's value is
-- sealed by the node with KILN_SECRETS_KEY before it gets here. See
-- store/meta/variables.rs.
ALTER TABLE versions ADD COLUMN variables TEXT NOT NULL DEFAULT '{}';
CREATE TABLE variables (
    function    TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    value       BYTEA NOT NULL,
    secret      BOOLEAN NOT NULL,
    updated_ms  BIGINT NOT NULL,
    updated_by  TEXT,
    PRIMARY KEY (function, scope, key)
);
