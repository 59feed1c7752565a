"""The OpenAI-compatible server: protocol, serving, scheduling, metrics and the ``knn-ssd`` command line."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed knn-ssd distribution's version (``unknown`` when run from a tree that is not installed)."""
    try:
        return version("knn-ssd")
    except PackageNotFoundError:
        return "unknown"
