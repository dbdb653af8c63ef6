"""Where thrifty keeps what it builds once and reuses: $THRIFTY_CACHE_DIR, default ~/.cache/thrifty."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The folder for one kind of cached file ("tokenizers", "aot", "kernels"); not created here."""
    root = os.environ.get("THRIFTY_CACHE_DIR") or Path.home() / ".cache" / "thrifty"
    return Path(root) / kind
