"""What the CPU is, from /proc/cpuinfo (Linux); None elsewhere or where the field is missing."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpuinfo_field(name: str) -> str | None:
    """The first value of `name` ("model name", "vendor_id") in /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None
