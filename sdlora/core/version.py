"""sdlora's version, kept at the bottom of the package so every layer may record it (PNG parameters, metadata)."""

__version__ = "0.1.0"
