"""The database: schema, connection and migrations, batched writes, reads for reporting."""
