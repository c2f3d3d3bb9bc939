"""Two model versions compared, as one self-contained HTML page (`enrich model compare --html`).

The figures are `model.compare`'s; this module only lays them out, through the
package's Jinja2 template `templates/compare.html.j2` with autoescape on (class
keys and versions come from model files), in the run report's style and under
the same Content-Security-Policy: the page loads nothing.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from enrichment import PROJECT_NAME, __version__
from enrichment.files import write_atomically
from enrichment.model.compare import MIN_REVIEWS, Comparison
from enrichment.store.schema import utc_now

TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("enrichment.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render_comparison(comparison: Comparison) -> str:
    return TEMPLATES.get_template("compare.html.j2").render(
        comparison=comparison,
        min_reviews=MIN_REVIEWS,
        generated=utc_now(),
        project=PROJECT_NAME,
        version=__version__,
    )


def write_comparison(comparison: Comparison, path: Path) -> Path:
    """Write the page to `path` (whole or not at all)."""
    write_atomically(path, render_comparison(comparison).encode("utf-8"))
    return path
