"""The database: schema, connection and migrations, every state change of a run and a batch
(`runs`, `batches`: one transaction each), batched writes, and reads for reporting."""
