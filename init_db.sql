-- Schema of the vote aggregation service.
--
-- Idempotent: safe to apply any number of times, by the service at start-up
-- (when its tables are missing) or by hand:
--     psql -U postgres -d election_votes -f init_db.sql
-- A database of an older schema version needs its migrations first: python aggregator.py --init-db
-- applies them and this file in one transaction (migrations/README.md).
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

-- No index on (law_id, choice), and the one earlier versions made is dropped: no statement reads
-- vote_audit by law (the recount groups the whole table, which reads the table anyway), and it cost
-- every vote one more index entry and its WAL (docs/performance.md#what-a-vote-costs-postgresql).
-- No version of the code relies on it either way: the schema's version does not change.
DO $$
BEGIN
    IF to_regclass('vote_audit_law_choice_idx') IS NOT NULL THEN
        DROP INDEX vote_audit_law_choice_idx;
    END IF;
END $$;
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

-- ---------------------------------------------------------------------------
-- Tamper evidence: hash chains (docs/security.md#tamper-evidence).
--
-- Each flush worker of each running instance keeps a chain of its own. Every
-- committed batch that inserted audit rows adds one link, in the same
-- transaction: the new rows' vote_hash values, their digests (32 bytes each, in
-- the same order), and
--     digest = sha256(previous digest || int8send(seq) || sha256(hashes joined by ',' || row_digests))
-- (the first link's previous digest is sha256(chain_id)). vote_audit itself is
-- unchanged: a row's link is found by its vote_hash.
-- `python aggregator.py verify` recomputes all of it.
CREATE TABLE IF NOT EXISTS vote_chain (
    chain_id     varchar(100)  NOT NULL,
    seq          bigint        NOT NULL CHECK (seq > 0),
    vote_hashes  varchar(64)[] NOT NULL,
    row_digests  bytea         NOT NULL,
    digest       bytea         NOT NULL,
    committed_at timestamptz   NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, seq)
);
-- Digests do not compress: spare the server the attempt.
ALTER TABLE vote_chain ALTER COLUMN row_digests SET STORAGE EXTERNAL;

-- How the link's row digests were computed (chain.py): 1 by PostgreSQL,
-- recorded_at included (earlier versions); 2 by the service, from the votes it sent.
ALTER TABLE vote_chain ADD COLUMN IF NOT EXISTS digest_format smallint NOT NULL DEFAULT 1
    CHECK (digest_format IN (1, 2));

-- ---------------------------------------------------------------------------
-- Append-only (docs/security.md#the-append-only-audit).
--
-- vote_audit, duplicate_attempts and vote_chain refuse UPDATE, DELETE and
-- TRUNCATE; vote_results refuses DELETE and TRUNCATE, and an UPDATE that would
-- lower a count. The only way past is the maintenance path: a role that owns
-- the table (or a superuser), inside a transaction that says so first:
--     BEGIN; SET LOCAL vote_aggregator.maintenance = 'on'; ...; COMMIT;
-- verify then reports whatever the maintenance changed in the audit trail.
CREATE OR REPLACE FUNCTION vote_maintenance_allowed(relation oid) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('vote_aggregator.maintenance', true), '') = 'on'
       AND pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = relation), 'USAGE')
$$;

CREATE OR REPLACE FUNCTION vote_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF vote_maintenance_allowed(TG_RELID) THEN
        RAISE WARNING 'maintenance: % on % by %', TG_OP, TG_TABLE_NAME, current_user;
        RETURN CASE WHEN TG_LEVEL = 'STATEMENT' THEN NULL WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    -- Nested, not AND-ed: PL/pgSQL does not promise to stop at the first false operand.
    IF TG_TABLE_NAME = 'vote_results' AND TG_OP = 'UPDATE' THEN
        IF NEW.law_id = OLD.law_id AND NEW.oui_count >= OLD.oui_count AND NEW.non_count >= OLD.non_count THEN
            RETURN NEW;  -- totals only move forward
        END IF;
    END IF;
    RAISE EXCEPTION '% on % refused: the table is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'maintenance path: docs/security.md#the-append-only-audit';
END $$;

DO $$
DECLARE
    rel text;
BEGIN
    FOREACH rel IN ARRAY ARRAY['vote_audit', 'duplicate_attempts', 'vote_chain', 'vote_results'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger
                       WHERE tgrelid = rel::regclass AND tgname = 'append_only_rows') THEN
            EXECUTE format('CREATE TRIGGER append_only_rows BEFORE UPDATE OR DELETE ON %I '
                           'FOR EACH ROW EXECUTE FUNCTION vote_append_only()', rel);
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger
                       WHERE tgrelid = rel::regclass AND tgname = 'append_only_truncate') THEN
            EXECUTE format('CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON %I '
                           'FOR EACH STATEMENT EXECUTE FUNCTION vote_append_only()', rel);
        END IF;
    END LOOP;
END $$;

-- ---------------------------------------------------------------------------
-- Schema version (docs/operations.md#upgrading; schema.py). One row per version this database was
-- brought to; the highest is its version. oldest_code: the oldest code (by the schema version it
-- was written for) that still counts correctly on it, for a rolling upgrade's old instances.
-- A database with the tables above and no schema_version is version 1.
CREATE TABLE IF NOT EXISTS schema_version (
    version     integer     PRIMARY KEY CHECK (version > 0),
    oldest_code integer     NOT NULL CHECK (oldest_code BETWEEN 1 AND version),
    applied_at  timestamptz NOT NULL DEFAULT now(),
    applied_by  name        NOT NULL DEFAULT current_user
);

-- ---------------------------------------------------------------------------
-- The service's role (docs/security.md#least-privilege): exactly what the
-- service does, nothing more. Creating the role is a separate step,
-- service_role.sql; applying this file again re-grants to it.
-- The primary's standbys as the service needs to see them (POSTGRES_REQUIRE_SYNC_STANDBY), without
-- pg_read_all_stats, which would also show it every session's queries: this function runs with its
-- owner's (an administrator's) rights and returns only each standby's name, sync state and lag.
-- pg_temp named last: left out, PostgreSQL would search it first, and a caller's temporary table
-- named pg_stat_replication would stand in for the view.
CREATE OR REPLACE FUNCTION vote_replication_standbys()
RETURNS TABLE (application_name text, sync_state text, lag_bytes bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT application_name::text, sync_state::text, pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint
    FROM pg_stat_replication ORDER BY application_name
$$;
REVOKE ALL ON FUNCTION vote_replication_standbys() FROM PUBLIC;

CREATE OR REPLACE FUNCTION vote_aggregator_grant(grantee name) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- From nothing, so that a right granted by hand earlier does not linger.
    EXECUTE format('REVOKE ALL ON vote_results, vote_audit, duplicate_attempts, vote_chain, vote_statistics, '
                   'schema_version FROM %I', grantee);
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), grantee);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), grantee);
    -- INSERT ... ON CONFLICT DO NOTHING RETURNING, and reading stored votes back.
    EXECUTE format('GRANT SELECT, INSERT ON vote_audit, vote_chain TO %I', grantee);
    -- ON CONFLICT ON CONSTRAINT reads the key's columns; RETURNING id tells a new attempt from one on record.
    EXECUTE format('GRANT SELECT, INSERT ON duplicate_attempts TO %I', grantee);
    -- INSERT ... ON CONFLICT DO UPDATE of the counts; the trigger lets them only grow.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE (oui_count, non_count, updated_at) ON vote_results TO %I', grantee);
    -- Not vote_statistics: officials read results under a role of their own.
    -- No temporary tables: one named pg_class would shadow the catalog in an unpinned search_path.
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM %I', current_database(), grantee);
    -- The start-up check of the schema's version (schema.py).
    EXECUTE format('GRANT SELECT ON schema_version TO %I', grantee);
    -- The replication state, and nothing more of the server's activity.
    EXECUTE format('GRANT EXECUTE ON FUNCTION vote_replication_standbys() TO %I', grantee);
END $$;
REVOKE ALL ON FUNCTION vote_aggregator_grant(name) FROM PUBLIC;

DO $$
DECLARE
    grantee name := coalesce(nullif(current_setting('vote_aggregator.service_role', true), ''), 'vote_aggregator');
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = grantee) AND grantee <> current_user THEN
        PERFORM vote_aggregator_grant(grantee);
    END IF;
END $$;

-- ---------------------------------------------------------------------------
-- Hardening (docs/security.md#hardening).
--
-- Every trigger function and the functions the triggers and grants rely on resolve names in
-- pg_catalog first and in pg_temp last: a temporary table named pg_class cannot stand in for the
-- catalog (and open the maintenance path). The append-only triggers fire ALWAYS, so that
-- `SET session_replication_role = replica` does not switch them off. No role but the database's
-- owner creates temporary tables (PostgreSQL grants TEMPORARY to PUBLIC by default).
DO $$
DECLARE
    fn text;
    rel text;
BEGIN
    FOREACH fn IN ARRAY ARRAY['vote_maintenance_allowed(oid)', 'vote_append_only()', 'vote_aggregator_grant(name)'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', fn, current_schema());
    END LOOP;
    FOREACH rel IN ARRAY ARRAY['vote_audit', 'duplicate_attempts', 'vote_chain', 'vote_results'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ALWAYS TRIGGER append_only_rows', rel);
        EXECUTE format('ALTER TABLE %I ENABLE ALWAYS TRIGGER append_only_truncate', rel);
    END LOOP;
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
END $$;

-- Last, so that the version is recorded only once everything above is in place (psql -v
-- ON_ERROR_STOP=1 stops before it; --init-db runs migrations and this file in one transaction).
-- In step with schema.py's SCHEMA_VERSION and OLDEST_CODE (tests/test_schema.py).
INSERT INTO schema_version (version, oldest_code) VALUES (2, 1) ON CONFLICT (version) DO NOTHING;
