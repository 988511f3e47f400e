"""sdlora's version, kept at the bottom of the package so every layer may record it (PNG parameters, metadata).

The one place it is written: pyproject.toml reads the package's version from here, so keep it a plain string.
"""

__version__ = "0.1.0"
