"""The local Search API (shared with the demo) and the recorded real responses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from demo.search_api import KEY, SearchAPI, generated_item

REFERENCE = Path(__file__).resolve().parent / "data" / "search-api"
__all__ = ["KEY", "SearchAPI", "generated_item", "recorded_items"]


def recorded_items(name: str) -> list[dict[str, Any]]:
    return json.loads((REFERENCE / name).read_text(encoding="utf-8"))["items"]
