"""Real multi-rank tests (a package, so their module names can repeat those in tests/unit)."""
