"""Pipit's version, as installed, for every executable's --version and the node records."""

from __future__ import annotations

import importlib.metadata


def software_version() -> str:
    """The installed package's version (`pip install` of this tree), or "unknown"."""
    try:
        return importlib.metadata.version("pipit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
