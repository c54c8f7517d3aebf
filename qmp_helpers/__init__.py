"""qmp_helpers package."""
