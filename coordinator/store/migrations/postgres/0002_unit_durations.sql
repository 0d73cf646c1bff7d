-- How long each test unit (a Go package, a dist test) took on a builder the last time
-- it ran, so sharded test steps can balance units over helpers.
CREATE TABLE unit_durations (
    builder TEXT NOT NULL,
    unit TEXT NOT NULL,
    duration_ms BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (builder, unit)
);
