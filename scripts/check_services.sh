#!/usr/bin/env bash
# One line per unreachable server, saying how to start it; exit 1 if any is down.
# Reads the same variables as the service (environment first, then .env).
set -u
if [ -f .env ]; then
  while IFS='=' read -r key value; do
    case "$key" in ''|\#*) continue ;; esac
    [ -z "${!key+x}" ] && export "$key=$value"
  done < .env
fi
rabbit_host=${RABBITMQ_HOST:-localhost}
rabbit_port=${RABBITMQ_PORT:-5672}
pg_host=${POSTGRES_HOST:-localhost}
pg_port=${POSTGRES_PORT:-5432}

reachable() { timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

status=0
if ! reachable "$rabbit_host" "$rabbit_port"; then
  echo "RabbitMQ is not reachable at $rabbit_host:$rabbit_port; start it with: rabbitmq-server -detached (or: systemctl start rabbitmq-server)" >&2
  status=1
fi
if ! reachable "$pg_host" "$pg_port"; then
  echo "PostgreSQL is not reachable at $pg_host:$pg_port; start it with: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start (or: systemctl start postgresql)" >&2
  status=1
fi
exit $status
