#!/bin/sh
# The standby's entry point: on its first start, a copy of the primary (pg_basebackup), set to
# stream from it as "standby1", the name the primary's synchronous_standby_names waits for. Then
# the image's own entry point runs PostgreSQL as a hot standby. Promote it with:
#   docker compose -f deploy/docker-compose.ha.yml exec -u postgres postgres-standby pg_ctl promote
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 0700 "$PGDATA"
  until gosu postgres env PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup \
      --host=postgres-primary --username=replicator --pgdata="$PGDATA" \
      --wal-method=stream --write-recovery-conf --checkpoint=fast; do
    echo "waiting for the primary to accept a base backup"
    rm -rf "${PGDATA:?}"/*
    sleep 2
  done
  # The copy carries the primary's ALTER SYSTEM settings, synchronous_standby_names = 'standby1'
  # among them: promoted, this server would make every commit wait, for ever, for a standby1 that
  # no longer exists (the name was its own). The later line wins. After a promotion it has no synchronous standby until one
  # is built for it; the aggregators (POSTGRES_REQUIRE_SYNC_STANDBY) hold until then, and say so.
  printf "%s\n" \
    "primary_conninfo = 'host=postgres-primary user=replicator password=$REPLICATION_PASSWORD application_name=standby1'" \
    "synchronous_standby_names = ''" \
    | gosu postgres tee -a "$PGDATA/postgresql.auto.conf" > /dev/null
fi
exec docker-entrypoint.sh "$@"
