"""headscreen: export package."""
