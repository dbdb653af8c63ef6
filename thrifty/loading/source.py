"""Where a model's config and weights come from: a GGUF file or a Hugging Face directory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf

from thrifty.config import ModelConfig
from thrifty.errors import ModelLoadError
from thrifty.loading.gguf import iter_gguf_weights, open_gguf, read_gguf_config
from thrifty.loading.safetensors import iter_safetensors_weights, read_hf_config, safetensors_files
from thrifty.loading.weights import WeightTensor


@dataclass
class ModelSource:
    """An opened model: its config now, its weights on demand (streamed, one tensor at a time)."""

    path: Path  # the GGUF file, or the Hugging Face directory
    format: Literal["gguf", "hf"]
    config: ModelConfig
    gguf_reader: gguf.GGUFReader | None = None  # the tokenizer reads its metadata too

    def iter_weights(self) -> Iterator[tuple[str, WeightTensor]]:
        """(Hugging Face name, weight) pairs, in Hugging Face layout and semantics."""
        if self.gguf_reader is not None:
            return iter_gguf_weights(self.gguf_reader, self.config)
        return iter_safetensors_weights(self.path)


def open_model_source(path: str | Path) -> ModelSource:
    """Open a .gguf file, a Hugging Face directory, or a directory holding exactly one .gguf file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"file not found: {path}; run `thrifty models` to see installable models")
    if path.is_dir():
        if (path / "config.json").is_file():
            safetensors_files(path)  # fail now, not halfway through loading, if there are no weights
            return ModelSource(path, "hf", read_hf_config(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            found = f"several .gguf files ({', '.join(g.name for g in ggufs)})" if ggufs else "no .gguf file"
            raise ModelLoadError(
                f"{path} has no config.json and {found}; pass a .gguf file or a Hugging Face model directory")
        path = ggufs[0]
    reader = open_gguf(path)
    return ModelSource(path, "gguf", read_gguf_config(reader), reader)
