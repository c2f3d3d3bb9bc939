"""Batch image-classification enrichment of cultural-heritage records.

The library: one module per stage of the data flow (records -> schedule ->
fetch -> images -> model -> store -> export), with the CLI on top. Nothing here
imports Celery; `worker/` adapts these functions to tasks.
"""

__version__ = "0.1.0"
PROJECT_NAME = "heritage-enrichment"
