"""The local Search API (shared with the demo), one that rewrites its answers, and the
recorded real responses."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo.search_api import KEY, SearchAPI, generated_item

REFERENCE = Path(__file__).resolve().parent / "data" / "search-api"
__all__ = ["KEY", "RewritingSearchAPI", "SearchAPI", "generated_item", "recorded_items"]


def recorded_items(name: str) -> list[dict[str, Any]]:
    return json.loads((REFERENCE / name).read_text(encoding="utf-8"))["items"]


@dataclass
class RewritingSearchAPI(SearchAPI):
    """The local Search API answering badly: each successful page document is passed
    through `rewrite` (which changes it in place) before it is sent."""

    rewrite: Callable[[dict[str, Any]], None] | None = None

    def answer(self, path: str, params: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = super().answer(path, params)
        if status != 200 or self.rewrite is None:
            return status, headers, body
        document = json.loads(body)
        self.rewrite(document)
        return status, headers, json.dumps(document).encode()
