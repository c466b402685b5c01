"""headscreen: daemon package."""
