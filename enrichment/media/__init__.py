"""Third-party images: fetched safely (SSRF guard, limits, per-host politeness) and decoded."""
