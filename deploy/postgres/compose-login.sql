-- The compose stack only: lets the service's role (service_role.sql) log in with the stack's
-- password. Runs once, when the PostgreSQL data volume is created empty, after init_db.sql and
-- service_role.sql (docker-entrypoint-initdb.d runs its files in name order).
ALTER ROLE vote_aggregator LOGIN PASSWORD 'vote_aggregator';
