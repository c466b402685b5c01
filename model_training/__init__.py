"""headscreen: model_training package."""
