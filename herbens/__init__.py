"""herbens: competition-grade herbarium specimen classification (Kaggle Herbarium 2022)."""

__version__ = "0.1.0"
