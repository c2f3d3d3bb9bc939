"""Curator review: a web app and commands to accept or reject machine labels before publishing.

`queue` reads what to review and writes decisions; `stats` turns decisions
into precision and suggested thresholds; `exchange` writes them as a labelled
set and trades tasks with Label Studio; `app` serves the pages and JSON API.
"""
