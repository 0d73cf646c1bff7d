-- How long each test unit (a Go package, a dist test) took on a builder the last time
-- it ran, so sharded test steps can balance units over helpers.
CREATE TABLE unit_durations (
    builder TEXT NOT NULL,
    unit TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (builder, unit)
);
