-- Artifacts (SQLite): builds gain the kind 'artifact' (a build asked for over HTTP that
-- keeps its outputs), and the artifacts table lists the files each build kept.
-- Keep in step with ../postgres/0002_artifacts.sql.
--
-- SQLite cannot change a CHECK constraint in place, so builds is rebuilt. The migration
-- runs in a transaction with foreign keys on (PRAGMA foreign_keys cannot change there),
-- so dropping the old builds table would cascade to its children: its children are
-- rebuilt too, as new tables referencing the new builds table, and the old ones are
-- dropped children first. Renaming builds_new to builds then rewrites the new
-- children's references.

CREATE TABLE builds_new (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('post-submit', 'try', 'artifact')),
    repo TEXT NOT NULL,
    branch TEXT,
    rev TEXT NOT NULL,
    builder TEXT NOT NULL,
    try_id TEXT REFERENCES try_runs (id) ON DELETE CASCADE,
    state TEXT NOT NULL
        CHECK (state IN ('queued', 'running', 'ok', 'failed', 'infra-failure', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    summary TEXT
);
INSERT INTO builds_new (id, kind, repo, branch, rev, builder, try_id, state, attempts,
    created_at, started_at, finished_at, summary)
    SELECT id, kind, repo, branch, rev, builder, try_id, state, attempts,
        created_at, started_at, finished_at, summary FROM builds;

CREATE TABLE attempts_new (
    build_id TEXT NOT NULL REFERENCES builds_new (id) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    buildlet TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    state TEXT,
    error TEXT,
    PRIMARY KEY (build_id, n)
);
INSERT INTO attempts_new (build_id, n, buildlet, started_at, finished_at, state, error)
    SELECT build_id, n, buildlet, started_at, finished_at, state, error FROM attempts;

CREATE TABLE build_logs_new (
    build_id TEXT PRIMARY KEY REFERENCES builds_new (id) ON DELETE CASCADE,
    -- How data is compressed ('zlib').
    encoding TEXT NOT NULL,
    -- Uncompressed size in bytes.
    size INTEGER NOT NULL,
    data BLOB NOT NULL
);
INSERT INTO build_logs_new (build_id, encoding, size, data)
    SELECT build_id, encoding, size, data FROM build_logs;

DROP TABLE attempts;
DROP TABLE build_logs;
DROP TABLE builds;
ALTER TABLE builds_new RENAME TO builds;
ALTER TABLE attempts_new RENAME TO attempts;
ALTER TABLE build_logs_new RENAME TO build_logs;

CREATE UNIQUE INDEX builds_post_submit_once ON builds (repo, rev, builder)
    WHERE kind = 'post-submit';
CREATE INDEX builds_by_state ON builds (state, created_at);
CREATE INDEX builds_recent ON builds (finished_at DESC, id DESC) WHERE finished_at IS NOT NULL;
CREATE INDEX builds_by_try ON builds (try_id) WHERE try_id IS NOT NULL;
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
    size INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (build_id, name)
);
CREATE INDEX artifacts_by_age ON artifacts (created_at, build_id, name);
CREATE INDEX artifacts_by_sha256 ON artifacts (sha256);
