"""Curator review: a web app and commands to accept or reject machine labels before publishing.

The store reads what to review (`store/review_queue.py`) and records the
decisions (`store/decisions.py`); here, `stats` turns decisions into precision
and suggested thresholds, `exchange` writes them as a labelled set and trades
tasks with Label Studio, and `app` serves the pages and JSON API behind the
`guard`.
"""
