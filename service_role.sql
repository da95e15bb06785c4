-- The service's PostgreSQL role, with exactly the rights it needs (docs/security.md#least-privilege).
--
-- Run once per database, as an administrator, after init_db.sql:
--     psql -U postgres -d election_votes -v ON_ERROR_STOP=1 -f init_db.sql
--     psql -U postgres -d election_votes -v ON_ERROR_STOP=1 -f service_role.sql
-- then let it log in, with a password typed at the prompt (psql sends it hashed):
--     psql -U postgres -c 'ALTER ROLE vote_aggregator LOGIN' -c '\password vote_aggregator'
--
-- The role is vote_aggregator unless the session sets another name first:
--     PGOPTIONS='-c vote_aggregator.service_role=other_name' psql ...
-- It is created NOLOGIN, not a superuser, owning nothing; init_db.sql's
-- vote_aggregator_grant() gives it SELECT and INSERT where the service writes,
-- UPDATE of the counts in vote_results only, and no UPDATE, DELETE or TRUNCATE
-- of the audit trail. Idempotent.
DO $$
DECLARE
    grantee name := coalesce(nullif(current_setting('vote_aggregator.service_role', true), ''), 'vote_aggregator');
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = grantee) THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS',
                           grantee);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created meanwhile by another session
        END;
    END IF;
    PERFORM vote_aggregator_grant(grantee);
END $$;

-- Before PostgreSQL 15 every role may create tables in schema public; the
-- service must not be able to shadow a table with one of its own.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
