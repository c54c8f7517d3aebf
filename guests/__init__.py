"""guests package."""
