"""A run: a scope scheduled durably, cut into batches, each batch fetched, classified and stored."""
