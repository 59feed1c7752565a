"""Where knn-ssd keeps what it builds once: converted weights, compiled kernels, packaged models."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (``$KNN_SSD_CACHE`` overrides ``~/.cache/knn-ssd``)."""
    return Path(os.environ.get("KNN_SSD_CACHE", Path.home() / ".cache" / "knn-ssd"))
