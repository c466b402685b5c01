"""headscreen: db package."""
