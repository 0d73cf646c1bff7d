-- User tokens for the public API and the pages: a token is `<id>.<secret>`; only a
-- SHA-256 of the secret is stored, never the secret itself.
CREATE TABLE user_tokens (
    id TEXT PRIMARY KEY,
    user_name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('viewer', 'developer', 'operator', 'admin')),
    -- Hex SHA-256 of the secret half of the token.
    secret_hash TEXT NOT NULL,
    -- Free text saying what the token is for (may be empty).
    note TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX user_tokens_newest ON user_tokens (created_at DESC, id DESC);
