"""The run report for curators: one self-contained HTML page."""
