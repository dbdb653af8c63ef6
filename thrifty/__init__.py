"""thrifty: an inference engine for generative language models that spends less per token."""

from typing import Any

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import thrifty.kv.blocks` (or the CLI's --help) stays light.
    if name == "LLM":
        from thrifty.api import LLM
        return LLM
    if name == "SamplingParams":
        from thrifty.engine.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'thrifty' has no attribute {name!r}")
