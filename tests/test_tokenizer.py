"""Tokenizer: ids and chat templates match transformers' own GGUF tokenizer; text round-trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings, strategies as st
from transformers import AutoTokenizer

import thrifty.loading.tokenizer as tokenizer_module
from thrifty.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from thrifty.loading.tokenizer import Tokenizer
from tests.fixtures.tiny_tokenizer import (
    BOS_TOKEN_ID, ENDOFTEXT_ID, EOS_TOKEN_ID, IM_END_ID, IM_START_ID, PAD_TOKEN_ID, add_tiny_tokenizer,
    write_tokenizer_gguf,
)

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nend",
    "naïve café — déjà vu, Ünïcödé Ω≈ç√∫ ﬁ",
    "日本語のテキストと中文，한국어",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧 zero\u200bwidth",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn> <bos> <eos>",
    "1234567890 3.14159 -1e-9 0x1F",
    "The quick brown fox jumps over the lazy dog. I said: \"you and the system!\"",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? Answer with 😀 too."},
]

SETTINGS = settings(max_examples=150, deadline=None)


def reference_tokenizer(path: Path):
    """transformers' own tokenizer for a GGUF file: what ours must match."""
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# -- the tiny tokenizer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tokenizer_gguf(tmp_path_factory.mktemp("tok") / "tiny-tok.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(tiny_gguf)


@pytest.fixture(scope="module")
def tiny_reference(tiny_gguf):
    return reference_tokenizer(tiny_gguf)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tiny, tiny_reference, text):
    assert tiny.encode(text) == tiny_reference.encode(text)
    assert tiny.encode(text, add_special_tokens=False) == tiny_reference.encode(text, add_special_tokens=False)
    ids = tiny.encode(text)
    assert tiny.decode(ids) == tiny_reference.decode(ids, skip_special_tokens=True)
    assert tiny.convert_ids_to_tokens(ids) == tiny_reference.convert_ids_to_tokens(ids)


@SETTINGS
@given(st.text(max_size=80))
def test_ids_match_transformers_on_any_text(tiny, tiny_reference, text):
    assert tiny.encode(text) == tiny_reference.encode(text)


@SETTINGS
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=120))
def test_ascii_round_trips(tiny, text):
    assert tiny.decode(tiny.encode(text), skip_special_tokens=False) == text


@SETTINGS
@given(st.text(max_size=80))
def test_unicode_round_trips(tiny, text):
    # st.text covers the multi-byte UTF-8 planes (accents, CJK, emoji); every byte has a token.
    assert tiny.decode(tiny.encode(text), skip_special_tokens=False) == text


def test_merges_apply(tiny):
    for word in (" the", "system", "assistant", "user"):
        assert tiny.convert_ids_to_tokens(tiny.encode(word)) == [word.replace(" ", "Ġ")]


def test_special_tokens_stay_whole_and_are_skipped_on_decode(tiny):
    ids = tiny.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == IM_START_ID and ids[-1] == IM_END_ID
    assert tiny.decode(ids) == "user\nhi"
    assert tiny.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_special_ids(tiny):
    assert tiny.vocab_size == 320
    assert tiny.bos_token_id == BOS_TOKEN_ID
    assert tiny.eos_token_id == EOS_TOKEN_ID
    assert tiny.pad_token_id == PAD_TOKEN_ID
    # eos first, then the other special end-of-turn markers: here <|endoftext|>
    assert tiny.eos_token_ids == [EOS_TOKEN_ID, ENDOFTEXT_ID]


def test_eot_token_id_from_metadata_ends_generation(tmp_path):
    path = tmp_path / "eot.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    add_tiny_tokenizer(writer)
    writer.add_eot_token_id(IM_START_ID)  # odd on purpose: only the metadata can put it in the set
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert Tokenizer.from_gguf(path).eos_token_ids == [EOS_TOKEN_ID, ENDOFTEXT_ID, IM_START_ID]


def test_add_bos_flag_is_respected(tiny, tmp_path):
    assert tiny.encode("Hello")[0] != BOS_TOKEN_ID  # the file says add_bos_token = false
    path = write_tokenizer_gguf(tmp_path / "bos.gguf", add_bos=True)
    with_bos = Tokenizer.from_gguf(path)
    assert with_bos.encode("Hello") == [BOS_TOKEN_ID] + tiny.encode("Hello")
    assert with_bos.encode("Hello", add_special_tokens=False) == tiny.encode("Hello")
    assert with_bos.encode("Hello") == reference_tokenizer(path).encode("Hello")


# -- chat templates ---------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tiny, tiny_reference, add_generation_prompt):
    for messages in (CONVERSATION, CONVERSATION[1:]):  # with a system message, and the template's default one
        expected = tiny_reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert tiny.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_renders_chatml(tiny):
    assert tiny.has_chat_template
    assert tiny.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_override_template_and_template_kwargs(tiny):
    template = "{% for m in messages %}[{{ m.role }}|{{ bos_token }}|{{ flavor }}]{{ m.content }}{% endfor %}"
    rendered = tiny.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template, flavor="mint")
    assert rendered == "[user|<|im_start|>|mint]x"


def test_base_model_without_template_says_what_to_do(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "base.gguf", chat_template=None)
    base = Tokenizer.from_gguf(path, name="tiny-base")
    assert not base.has_chat_template
    with pytest.raises(InvalidRequestError, match=r"model tiny-base has no chat template \(it is a base model\).*"
                                                  r"--chat-template FILE"):
        base.apply_chat_template([{"role": "user", "content": "hi"}])
    override = "{{ messages[0].content }}"
    assert base.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=override) == "hi"


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ({"role": "user", "content": "hi"}, "non-empty list"),
    (["hi"], r"messages\[0\] is a str"),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}],
     r"messages\[1\] has role 'robot'; use one of system, user, assistant, tool"),
    ([{"content": "hi"}], r"messages\[0\] has role None"),
    ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a string, got NoneType"),
    ([{"role": "user"}], r"must be a string"),
])
def test_invalid_messages_are_rejected(tiny, messages, message):
    with pytest.raises(InvalidRequestError, match=message):
        tiny.apply_chat_template(messages)


def test_template_errors_become_invalid_request_errors(tiny):
    strict = "{% if messages[0].role != 'user' %}{{ raise_exception('conversations must start with user') }}{% endif %}"
    with pytest.raises(InvalidRequestError, match="rejected the messages: conversations must start with user"):
        tiny.apply_chat_template([{"role": "assistant", "content": "hi"}], chat_template=strict)
    with pytest.raises(InvalidRequestError, match=r"not valid Jinja2 \(line 1"):
        tiny.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{% for %}")


# -- loading errors ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no GGUF file at"):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all, just text")
    with pytest.raises(ModelLoadError, match="cannot read .* as a GGUF file"):
        Tokenizer.from_gguf(path)


def test_gguf_without_tokenizer(tmp_path):
    path = tmp_path / "notok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="has no tokenizer in its metadata"):
        Tokenizer.from_gguf(path)


def test_unsupported_tokenizer_model(tmp_path):
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="cannot build the tokenizer.*'bert'"):
        Tokenizer.from_gguf(path)


# -- the conversion cache ---------------------------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("THRIFTY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenizers"


def test_small_vocabularies_are_not_cached(tiny_gguf, cache_dir):
    Tokenizer.from_gguf(tiny_gguf)
    assert not cache_dir.exists()


def test_cache_is_written_then_used(tiny_gguf, tiny, cache_dir, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MIN_VOCAB_TO_CACHE", 0)
    built = Tokenizer.from_gguf(tiny_gguf)
    assert len(list(cache_dir.glob("*.tokenizer.json"))) == 1 and len(list(cache_dir.glob("*.meta.json"))) == 1

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached tokenizer was converted again")

    monkeypatch.setattr(tokenizer_module, "get_gguf_tokenizer", no_conversion)
    cached = Tokenizer.from_gguf(tiny_gguf)
    for text in TEXTS:
        assert cached.encode(text) == built.encode(text) == tiny.encode(text)
    assert cached.eos_token_ids == built.eos_token_ids
    assert cached.apply_chat_template(CONVERSATION) == tiny.apply_chat_template(CONVERSATION)


def test_a_changed_file_replaces_its_cache_entry(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MIN_VOCAB_TO_CACHE", 0)
    path = write_tokenizer_gguf(tmp_path / "changing.gguf")
    Tokenizer.from_gguf(path)
    old = set(cache_dir.iterdir())
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    Tokenizer.from_gguf(path)
    new = set(cache_dir.iterdir())
    assert len(new) == 2 and not old & new


def test_a_damaged_cache_entry_is_rebuilt(tiny_gguf, tiny, cache_dir, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MIN_VOCAB_TO_CACHE", 0)
    Tokenizer.from_gguf(tiny_gguf)
    (tokenizer_file,) = cache_dir.glob("*.tokenizer.json")
    tokenizer_file.write_text("{ truncated")
    assert Tokenizer.from_gguf(tiny_gguf).encode(TEXTS[-1]) == tiny.encode(TEXTS[-1])
    json.loads(tokenizer_file.read_text())  # rewritten whole


def test_cache_can_be_turned_off(tiny_gguf, cache_dir, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MIN_VOCAB_TO_CACHE", 0)
    Tokenizer.from_gguf(tiny_gguf, cache=False)
    assert not cache_dir.exists()


# -- Hugging Face directories -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_reference) -> Path:
    directory = tmp_path_factory.mktemp("hf")
    tiny_reference.save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_TOKEN_ID, 7]}))
    return directory


def test_pretrained_dir_matches_transformers(hf_dir, tiny):
    from_dir = Tokenizer.from_pretrained_dir(hf_dir)
    reference = AutoTokenizer.from_pretrained(str(hf_dir))
    for text in TEXTS:
        assert from_dir.encode(text) == reference.encode(text) == tiny.encode(text)
    assert from_dir.apply_chat_template(CONVERSATION) == tiny.apply_chat_template(CONVERSATION)
    # eos, then generation_config.json's extra id and the end-of-turn specials
    assert from_dir.eos_token_ids == [EOS_TOKEN_ID, ENDOFTEXT_ID, 7]


def test_pretrained_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError, match="has no tokenizer.json"):
        Tokenizer.from_pretrained_dir(tmp_path)


# -- real models ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def real(request, tmp_path_factory):
    """(catalog name, our tokenizer loaded through a fresh cache, transformers' tokenizer)."""
    from thrifty.catalog import CATALOG

    entry = CATALOG[request.param]
    if not entry.is_installed():
        pytest.skip(f"{entry.name} is not installed ({entry.install_command})")
    path = entry.resolve_path()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THRIFTY_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        Tokenizer.from_gguf(path)  # converts and caches
        ours = Tokenizer.from_gguf(path, name=entry.name)  # the cached path, the one users hit
    return entry.name, ours, reference_tokenizer(path)


@pytest.mark.integration
@pytest.mark.parametrize("text", TEXTS)
def test_real_ids_match_transformers(real, text):
    _, ours, reference = real
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids)


@pytest.mark.integration
@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60))
def test_real_ids_match_transformers_on_any_text(real, text):
    _, ours, reference = real
    assert ours.encode(text) == reference.encode(text)


@pytest.mark.integration
def test_real_special_ids(real):
    name, ours, reference = real
    assert ours.vocab_size == len(reference)
    assert ours.bos_token_id == reference.bos_token_id
    assert ours.pad_token_id == reference.pad_token_id
    expected = {"smollm2-135m": [2, 0], "gemma3-270m": [1, 106]}[name]  # + <|endoftext|> / <end_of_turn>
    assert ours.eos_token_ids == expected
    bos_first = {"smollm2-135m": False, "gemma3-270m": True}[name]  # the files' add_bos_token
    assert (ours.encode("hi")[0] == ours.bos_token_id) is bos_first


@pytest.mark.integration
def test_real_chat_template_matches_transformers(real):
    name, ours, reference = real
    if name == "gemma3-270m":  # a base model: no template of its own, but an override renders the same
        with pytest.raises(InvalidRequestError, match="model gemma3-270m has no chat template"):
            ours.apply_chat_template(CONVERSATION)
        template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}"
                    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
        expected = reference.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        assert ours.apply_chat_template(CONVERSATION, chat_template=template) == expected
        return
    expected = reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    rendered = ours.apply_chat_template(CONVERSATION)
    assert rendered == expected
    assert rendered.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    expected_ids = reference.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False)
    assert ours.encode(rendered, add_special_tokens=False) == expected_ids
