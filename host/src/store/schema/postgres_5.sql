-- Each idempotency claim carries its request's random token, required to finish or give it
-- up (a request that outlived its claim cannot touch the next one), and answers are
-- sealed under a key derived from the caller's credentials. Rows kept by earlier Kiln
-- (answers in clear, no token) are dropped: they only shorten a retry window.
DELETE FROM idempotency;
ALTER TABLE idempotency ADD COLUMN token TEXT NOT NULL DEFAULT '';
