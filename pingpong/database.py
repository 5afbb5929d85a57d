"""The database at start: wait until it accepts connections, then apply migrations, one process at a time.

`manage.py serve --migrate` (the Docker image's command) runs `migrate` before serving. Replicas that
start together against one PostgreSQL would race in Django's migrate (each reads what is applied,
then creates tables, and the slower one fails on a table the other just made), so they take turns
under a PostgreSQL advisory lock and the later ones find nothing left to apply. SQLite needs no lock:
it is one machine's file, and `make run` migrates before it serves.
"""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from django.core.management import call_command
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections

logger = logging.getLogger("pingpong.database")

# How long `serve --migrate` waits for the database to accept a connection: a PostgreSQL container
# that compose reported healthy may still restart once after its first initialisation.
WAIT_SECONDS = 60.0
WAIT_INTERVAL_SECONDS = 1.0
# The advisory-lock key every pingpong process takes around `migrate` ("ping" in ASCII).
MIGRATION_LOCK_KEY = 0x70696E67


def wait_ready(
    *, timeout: float = WAIT_SECONDS, interval: float = WAIT_INTERVAL_SECONDS, alias: str = DEFAULT_DB_ALIAS
) -> None:
    """Connect until the database accepts; after `timeout` seconds the last `OperationalError` is raised."""
    connection = connections[alias]
    deadline = time.monotonic() + timeout
    for attempt in range(1, int(timeout / interval) + 2):
        try:
            connection.ensure_connection()
            return
        except OperationalError as error:
            connection.close()
            if time.monotonic() + interval > deadline:
                raise
            logger.info("database not ready (attempt %d: %s); retrying in %gs", attempt, str(error).strip(), interval)
            time.sleep(interval)
    connection.ensure_connection()  # the last chance: raises what the database says


@contextmanager
def migration_lock(*, alias: str = DEFAULT_DB_ALIAS) -> Iterator[None]:
    """Hold PostgreSQL's session advisory lock MIGRATION_LOCK_KEY (waiting for it); a no-op elsewhere."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK_KEY])
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK_KEY])


def migrate(*, timeout: float = WAIT_SECONDS, alias: str = DEFAULT_DB_ALIAS) -> None:
    """Wait for the database, apply every migration under the lock, and close the connection before serving."""
    wait_ready(timeout=timeout, alias=alias)
    try:
        with migration_lock(alias=alias):
            call_command("migrate", interactive=False, database=alias, verbosity=0)
    finally:
        connections[alias].close()
    logger.info("database migrated (%s)", connections[alias].vendor)
