-- Initial dashboard schema (SQLite). Times are unix milliseconds; ids are uuid v7 text.
-- Keep in step with ../postgres/0001_initial.sql: same tables, columns and indexes.

CREATE TABLE commits (
    -- Insertion order, the tie-break after commit_time when listing newest first.
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    repo TEXT NOT NULL,
    branch TEXT NOT NULL,
    hash TEXT NOT NULL,
    -- Parent hashes, one per line.
    parents TEXT NOT NULL,
    author TEXT NOT NULL,
    message TEXT NOT NULL,
    commit_time INTEGER NOT NULL,
    UNIQUE (repo, branch, hash)
);
CREATE INDEX commits_newest ON commits (repo, branch, commit_time DESC, seq DESC);

CREATE TABLE try_runs (
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    rev TEXT NOT NULL,
    patch BLOB,
    -- Builder names, one per line.
    builders TEXT NOT NULL,
    user_name TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX try_runs_newest ON try_runs (created_at DESC, id DESC);

CREATE TABLE builds (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('post-submit', 'try')),
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
-- Repeated polling must never enqueue the same post-submit build twice.
CREATE UNIQUE INDEX builds_post_submit_once ON builds (repo, rev, builder)
    WHERE kind = 'post-submit';
CREATE INDEX builds_by_state ON builds (state, created_at);
CREATE INDEX builds_recent ON builds (finished_at DESC, id DESC) WHERE finished_at IS NOT NULL;
CREATE INDEX builds_by_try ON builds (try_id) WHERE try_id IS NOT NULL;

CREATE TABLE attempts (
    build_id TEXT NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    buildlet TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    state TEXT,
    error TEXT,
    PRIMARY KEY (build_id, n)
);

CREATE TABLE build_logs (
    build_id TEXT PRIMARY KEY REFERENCES builds (id) ON DELETE CASCADE,
    -- How data is compressed ('zlib').
    encoding TEXT NOT NULL,
    -- Uncompressed size in bytes.
    size INTEGER NOT NULL,
    data BLOB NOT NULL
);
