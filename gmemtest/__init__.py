"""gmemtest package."""
