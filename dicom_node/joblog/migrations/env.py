"""Alembic environment: runs on the connection that `dicom_node.joblog.db.upgrade` passes in.

There is no alembic.ini and no logging set-up (the node configures logging itself). A new
revision is made the same way: a Config with script_location "dicom_node.joblog:migrations",
config.attributes["connection"] set, then `alembic.command.revision(config, autogenerate=True)`.
"""

from alembic import context

from dicom_node.joblog.tables import Base

connection = context.config.attributes["connection"]
# SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
context.configure(
    connection=connection, target_metadata=Base.metadata, render_as_batch=connection.dialect.name == "sqlite"
)
with context.begin_transaction():
    context.run_migrations()
