-- Artifacts (PostgreSQL): builds gain the kind 'artifact' (a build asked for over HTTP
-- that keeps its outputs), and the artifacts table lists the files each build kept.
-- Keep in step with ../sqlite/0002_artifacts.sql.

ALTER TABLE builds DROP CONSTRAINT builds_kind_check;
ALTER TABLE builds ADD CONSTRAINT builds_kind_check
    CHECK (kind IN ('post-submit', 'try', 'artifact'));

-- Identical artifact requests share one build: at most one unfinished per
-- (repo, commit, target); `builder` is the target `GOOS-GOARCH`.
CREATE UNIQUE INDEX builds_artifact_pending ON builds (repo, rev, builder)
    WHERE kind = 'artifact' AND state IN ('queued', 'running');
CREATE INDEX builds_artifact_key ON builds (repo, rev, builder, created_at)
    WHERE kind = 'artifact';

CREATE TABLE artifacts (
    build_id TEXT NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    -- Path relative to the collected directory, '/'-separated.
    name TEXT NOT NULL,
    -- Lowercase hex SHA-256 of the content; the file lives in the blob store under it.
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (build_id, name)
);
CREATE INDEX artifacts_by_age ON artifacts (created_at, build_id, name);
CREATE INDEX artifacts_by_sha256 ON artifacts (sha256);
