# Vote aggregation service.
#   docker build -t vote-aggregator .
#   docker run -e RABBITMQ_HOST=rabbitmq -e POSTGRES_HOST=postgres -p 8001:8001 vote-aggregator
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY aggregator.py config.py db.py metrics.py votes.py init_db.sql ./

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin aggregator
USER 10001

EXPOSE 8001
# The service drains on SIGTERM: give it SHUTDOWN_TIMEOUT_SECONDS (15 s by default)
# plus a margin, e.g. `docker stop -t 30`.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('PROMETHEUS_PORT', '8001'), timeout=2)"]

ENTRYPOINT ["python", "aggregator.py"]
