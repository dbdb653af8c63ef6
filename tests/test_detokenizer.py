"""Incremental detokenization: streamed pieces add up to the full decode, whatever the text."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from thrifty.catalog import CATALOG
from thrifty.engine.detokenizer import IncrementalDetokenizer
from thrifty.loading.tokenizer import Tokenizer
from tests.fixtures.tiny_tokenizer import write_tokenizer_gguf

TEXTS = [
    "Hello, world! How are you today?",
    "naïve café — 東京タワー 🚀🚀 ok",
    "def f(x):\n    return x ** 2\n",
    "  leading spaces and trailing   ",
    "emoji family 👨‍👩‍👧 and flags 🇫🇷",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path_factory.mktemp("tok") / "tiny.gguf"))


def stream(tokenizer: Tokenizer, prompt_ids: list[int], ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    return pieces


def check(tokenizer: Tokenizer, text: str) -> None:
    prompt = tokenizer.encode("Prompt:")
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, prompt, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    # Until the final flush, no piece ends in half a character.
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_on_byte_level_bpe(tiny, text):
    check(tiny, text)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=40))
def test_pieces_add_up_on_any_text(tiny, text):
    check(tiny, text)


def test_a_split_character_is_held_back_until_complete(tiny):
    ids = tiny.encode("🚀", add_special_tokens=False)
    assert len(ids) == 4  # one token per UTF-8 byte in the tiny vocabulary
    detok = IncrementalDetokenizer(tiny, tiny.encode("x"))
    assert [detok.add(t) for t in ids] == ["", "", "", "🚀"]


@pytest.mark.integration
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_on_the_real_tokenizers(model, text):
    entry = CATALOG[model]
    if not entry.is_installed():
        pytest.skip(f"{model} is not installed: {entry.install_command}")
    check(Tokenizer.from_gguf(entry.resolve_path()), text)
