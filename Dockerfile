# Vote aggregation service.
#   docker build -t vote-aggregator .
#   docker run --rm --stop-timeout 30 -e RABBITMQ_HOST=rabbitmq -e POSTGRES_HOST=postgres \
#       -p 127.0.0.1:8001:8001 vote-aggregator
#   docker run --rm -e ... vote-aggregator --check      # any aggregator.py option works the same
#   docker stop -t 30 <container>                      # above SHUTDOWN_TIMEOUT_SECONDS (15 s)
# docs/deploying.md has the rest (compose, TLS).
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# Every module aggregator.py imports, the schema db.py applies, and service_role.sql: the image
# carries both scripts an administrator applies for its version, e.g.
#   docker run --rm --entrypoint cat vote-aggregator service_role.sql | psql -U postgres -d election_votes
# (tests/test_deploy.py checks the list).
COPY aggregator.py amqp.py chain.py commands.py config.py consumer.py db.py dbconnect.py dberrors.py deadletter_publisher.py deadletters.py exits.py heads.py health.py httpauth.py initdb.py logsetup.py metrics.py pipeline.py replication.py results.py schema.py seal.py service.py summary.py systemd.py verify.py votes.py init_db.sql service_role.sql pyproject.toml ./
# The migrations --init-db applies before init_db.sql (schema.py).
COPY migrations/ migrations/
# Compiled once here, as root: the service's user cannot write to /app.
RUN python -m compileall -q /app \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin aggregator \
    && mkdir -p /var/lib/vote-aggregator && chown 10001 /var/lib/vote-aggregator
# The signed chain heads (docs/security.md#signed-heads), and the development signing key made next
# to them when CHAIN_SIGNING_KEY_FILE is unset: /app is not the service's to write. Mount a volume here.
ENV CHAIN_HEADS_FILE=/var/lib/vote-aggregator/chain-heads.jsonl
USER 10001

EXPOSE 8001
# The service drains on SIGTERM within SHUTDOWN_TIMEOUT_SECONDS (15 s by default) plus about a
# second; docker's default grace is 10 s. Run it with `docker run --stop-timeout 30` or stop it with
# `docker stop -t 30` (compose: stop_grace_period: 30s), or the drain is killed: nothing is lost,
# but the votes in flight are redelivered.
STOPSIGNAL SIGTERM
# /healthz fails (503) when the service has stopped counting: its connection loop stuck, or a vote
# held unacked past STALL_TIMEOUT_SECONDS while PostgreSQL answers. /readyz would also turn
# unhealthy during a database outage, which the service rides out by itself.
# It asks the address the service listens on: PROMETHEUS_BIND_ADDRESS, or loopback when that is every
# address (0.0.0.0, ::, unset). With PROMETHEUS_TLS_CERT_FILE set the port speaks TLS: the probe then
# uses https without checking the certificate, whose name is not that address (a local probe reading
# only ok or not ok).
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; env = os.environ.get; tls = bool(env('PROMETHEUS_TLS_CERT_FILE')); bound = env('PROMETHEUS_BIND_ADDRESS', ''); host = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '::': '::1'}.get(bound, bound); host = '[%s]' % host if ':' in host else host; context = ssl.create_default_context(); context.check_hostname = False; context.verify_mode = ssl.CERT_NONE; urllib.request.urlopen('%s://%s:%s/healthz' % ('https' if tls else 'http', host, env('PROMETHEUS_PORT', '8001')), timeout=2, context=context)"]

ENTRYPOINT ["python", "aggregator.py"]
