-- Rows in the backend run a request's inference shared (dynamic batching merges the
-- computes of many requests into one run; 0 for a request without inference).
ALTER TABLE usage ADD COLUMN batch_rows BIGINT NOT NULL DEFAULT 0;
