#!/bin/sh
# The primary's entry point. Once postgres-standby has been promoted, this server must not come back
# as a primary: the aggregators list it first in POSTGRES_HOST and would write to it again, next to
# the promoted one (two primaries, each with part of the count). It refuses to start, and says why,
# while postgres-standby answers as a primary. This is no fence: if postgres-standby cannot be
# reached at that moment, it starts. Patroni does this properly (docs/high-availability.md).
set -eu
if [ -s "$PGDATA/PG_VERSION" ] \
    && PGPASSWORD="$POSTGRES_PASSWORD" PGCONNECT_TIMEOUT=5 psql -h postgres-standby -U "$POSTGRES_USER" -d postgres \
        -Atc 'SELECT NOT pg_is_in_recovery()' 2>/dev/null | grep -qx t; then
  echo "postgres-standby has been promoted: this old primary must not accept writes again." >&2
  echo "Rebuild it as a standby of postgres-standby (pg_rewind or a new base backup), or remove its volume." >&2
  exit 1
fi
exec docker-entrypoint.sh "$@"
