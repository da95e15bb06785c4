#!/bin/sh
# Run once by the postgres image, when the primary's data volume is created empty: the role the
# standby streams with, the pg_hba.conf line that lets it in (replication connections do not match
# the image's "host all all" line), and the standby every commit waits for. ALTER SYSTEM takes
# effect at the real start that follows: the other first-start scripts still commit without it.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD '$REPLICATION_PASSWORD'" \
  -c "ALTER SYSTEM SET synchronous_standby_names = 'standby1'"
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
