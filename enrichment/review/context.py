"""What the review app's pages and API share: the database and the image cache."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from enrichment.review.images import ImageCache
from enrichment.store.database import Database

EXTENSION = "enrich_review"


@dataclass(frozen=True)
class ReviewContext:
    db: Database
    images: ImageCache


def review_context() -> ReviewContext:
    """The context of the app serving the current request."""
    return current_app.extensions[EXTENSION]
