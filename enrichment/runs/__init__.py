"""A run: a scope scheduled durably, cut into batches, each batch fetched, classified and stored.

`schedule` pages and dispatches, `pipeline` is one batch's compute, `lifecycle` its state
around that compute, `inprocess` runs batches here; their state changes are `store.runs`
and `store.batches`.
"""
