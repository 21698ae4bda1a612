"""Engine set-up and schema migrations for the job log.

SQLite is the default: one file shared by the receiver, the workers and the forwarder, each in
its own process. WAL lets readers run while one writer commits; write transactions start with
BEGIN IMMEDIATE so that two writers queue on the lock (busy_timeout) instead of one failing
when it upgrades a read to a write. Any other SQLAlchemy URL (PostgreSQL) is used as given.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url

BUSY_TIMEOUT_S = 30.0  # [database] busy_timeout_s
WRITE = {"begin_immediate": True}
"""Execution options of a write transaction (the engine's `begin` hook reads them)."""

_MIGRATIONS = "dicom_node.joblog:migrations"
_MIGRATION_LOCK_KEY = 0x6A6F626C6F67  # "joblog": serialises concurrent upgrades on PostgreSQL


def make_engine(url: str, busy_timeout_s: float = BUSY_TIMEOUT_S) -> Engine:
    """An engine for `url`; for a SQLite file, its folder is created and the pragmas set (a writer
    waits `busy_timeout_s` for another's lock before it fails)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    event.listen(engine, "connect", lambda connection, _record: _configure_sqlite(connection, busy_timeout_s))
    event.listen(engine, "begin", _begin_sqlite)
    return engine


def _configure_sqlite(dbapi_connection, busy_timeout_s: float) -> None:
    # The sqlite3 module's own implicit BEGIN is switched off so that `_begin_sqlite` decides.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {round(busy_timeout_s * 1000)}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = FULL")  # a committed job survives a power cut
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _begin_sqlite(connection: Connection) -> None:
    immediate = connection.get_execution_options().get("begin_immediate", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision; safe when several processes start at once.

    On SQLite the upgrade runs in one BEGIN IMMEDIATE transaction (DDL is transactional there),
    so a second process waits and then finds the schema current; PostgreSQL takes an advisory lock.
    """
    config = Config()
    config.set_main_option("script_location", _MIGRATIONS)
    with engine.execution_options(**WRITE).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
