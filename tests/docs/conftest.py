"""Fixtures of the documentation tests: the site's build hook (docs/hooks.py, loaded as MkDocs loads it: by path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="session")
def docs_hooks():
    """The module docs/hooks.py: the generators of the site's reference pages."""
    spec = importlib.util.spec_from_file_location("sdlora_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def docs_dir():
    """The folder of the site's pages."""
    return DOCS
