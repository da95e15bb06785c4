-- Schema of the vote aggregation service.
--
-- Idempotent: safe to apply any number of times, by the service at start-up
-- (when its tables are missing) or by hand:
--     psql -U postgres -d election_votes -f init_db.sql
--
-- Invariant kept by the service, in one transaction per batch:
--     for every law, vote_results = vote_audit grouped by (law_id, choice).

-- Per-law totals, incremented only by votes newly inserted into vote_audit.
CREATE TABLE IF NOT EXISTS vote_results (
    law_id     varchar(50) PRIMARY KEY,
    oui_count  bigint      NOT NULL DEFAULT 0 CHECK (oui_count >= 0),
    non_count  bigint      NOT NULL DEFAULT 0 CHECK (non_count >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per counted vote. vote_hash is the vote's identity: a second message
-- with the same hash is never counted again.
CREATE TABLE IF NOT EXISTS vote_audit (
    vote_hash   varchar(64)  PRIMARY KEY,
    citizen_id  varchar(100) NOT NULL CHECK (citizen_id <> ''),
    law_id      varchar(50)  NOT NULL CHECK (law_id <> ''),
    choice      varchar(3)   NOT NULL CHECK (choice IN ('oui', 'non')),
    "timestamp" timestamptz  NOT NULL,
    recorded_at timestamptz  NOT NULL DEFAULT now()
);

-- Recounts per law (the invariant check) and "who voted on this law".
CREATE INDEX IF NOT EXISTS vote_audit_law_choice_idx ON vote_audit (law_id, choice);
-- Looking up one citizen's ballots (audits, complaints).
CREATE INDEX IF NOT EXISTS vote_audit_citizen_idx ON vote_audit (citizen_id);

-- A message that reused a stored vote_hash with different content (another
-- choice, law, citizen or timestamp). The first vote stands; the attempt is kept
-- here. An exact copy of a stored vote is a redelivery, not an attempt, and is
-- not recorded. The unique key makes a redelivered attempt count once.
CREATE TABLE IF NOT EXISTS duplicate_attempts (
    id                bigint       GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vote_hash         varchar(64)  NOT NULL REFERENCES vote_audit (vote_hash),
    citizen_id        varchar(100) NOT NULL,
    law_id            varchar(50)  NOT NULL,
    choice            varchar(3)   NOT NULL CHECK (choice IN ('oui', 'non')),
    vote_timestamp    timestamptz  NOT NULL,
    attempt_timestamp timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT duplicate_attempts_once
        UNIQUE (vote_hash, citizen_id, law_id, choice, vote_timestamp)
);

CREATE INDEX IF NOT EXISTS duplicate_attempts_citizen_idx ON duplicate_attempts (citizen_id);
CREATE INDEX IF NOT EXISTS duplicate_attempts_time_idx ON duplicate_attempts (attempt_timestamp);

-- What officials read: totals and shares per law.
CREATE OR REPLACE VIEW vote_statistics AS
SELECT
    law_id,
    oui_count,
    non_count,
    oui_count + non_count AS total_votes,
    round(100.0 * oui_count / NULLIF(oui_count + non_count, 0), 2) AS oui_percentage,
    round(100.0 * non_count / NULLIF(oui_count + non_count, 0), 2) AS non_percentage,
    CASE
        WHEN oui_count > non_count THEN 'oui'
        WHEN non_count > oui_count THEN 'non'
        ELSE 'tie'
    END AS leading_choice,
    updated_at
FROM vote_results;
