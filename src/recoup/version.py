"""The package version, in the base layer so any room can record it without importing the package face."""

__version__ = "0.1.0"
