"""Session-wide fixtures: the tiny GGUF models every model and engine test runs on."""

from pathlib import Path

import pytest

from tests.fixtures.tiny_models import write_tiny_gemma3_gguf, write_tiny_llama_gguf


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny_llama") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_gemma3_gguf(tmp_path_factory) -> Path:
    return write_tiny_gemma3_gguf(tmp_path_factory.mktemp("tiny_gemma3") / "tiny-gemma3.gguf")


@pytest.fixture(scope="session")
def thrifty_server(tmp_path_factory):
    """`thrifty serve` on SmolLM2-135M in a subprocess, shared by the tests/test_server_*.py files."""
    from tests.server_process import real_server
    from thrifty.catalog import CATALOG

    if not CATALOG["smollm2-135m"].is_installed():
        pytest.skip(f"SmolLM2 is not installed: {CATALOG['smollm2-135m'].install_command}")
    server = real_server(tmp_path_factory.mktemp("server") / "thrifty-serve.log")
    yield server
    assert server.stop() == 0, server.output()  # SIGTERM drains and exits cleanly


@pytest.fixture(scope="module", params=["tiny_llama_gguf", "tiny_gemma3_gguf"])
def model_path(request) -> Path:
    """Each tiny model in turn, for engine tests that must hold on both architectures."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def without_skinny_kernel(monkeypatch):
    """float32 matmuls as on a CPU where thrifty's AVX-512 kernel cannot run: PyTorch's paths, and
    oneDNN-blocked weight copies for several rows."""
    monkeypatch.setenv("THRIFTY_SKINNY_KERNEL", "0")  # seen by graph builds in child processes too
