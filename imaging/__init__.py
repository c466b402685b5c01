"""headscreen: imaging package."""
