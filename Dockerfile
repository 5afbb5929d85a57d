# pingpong: daphne, one worker per CPU the container is given (with REDIS_URL; one without it).
# At start it applies migrations (`serve --migrate`: waits for the database, replicas take turns).
# docker-compose.yml runs several containers behind nginx with Redis.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_STATIC_ROOT=/app/staticfiles \
    # Without a DATABASE_URL of its own (compose gives PostgreSQL's) the image keeps SQLite where it may write.
    DATABASE_URL=sqlite:////app/data/db.sqlite3 \
    # Limits that fit one worker in 1 GiB at worst: see "Memory budget" in the README.
    PINGPONG_MAX_CONNECTIONS=4000 \
    PINGPONG_MAX_MESSAGE_BYTES=16384 \
    PINGPONG_MAX_PENDING_BYTES=131072

WORKDIR /app
COPY pyproject.toml README.md manage.py ./
COPY project ./project
COPY pingpong ./pingpong
RUN pip install . \
 && DJANGO_DEBUG=1 python manage.py collectstatic --noinput \
 && useradd --system --uid 10001 pingpong \
 && install -d -o pingpong /app/data
USER pingpong

EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["python", "manage.py", "serve", "--migrate", "--host", "0.0.0.0", "--port", "8000", "--workers", "auto"]
