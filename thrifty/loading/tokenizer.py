"""Text to token ids and back, and chat templates, for GGUF files and Hugging Face directories.

The work is done by transformers' fast tokenizer, built the way transformers builds it, so the
ids and the rendered chat templates match transformers (the reference in the tests) exactly.
Building one from a GGUF file takes seconds for a large vocabulary, so the converted tokenizer is
cached under ~/.cache/thrifty/tokenizers (or $THRIFTY_CACHE_DIR/tokenizers).

Generation ends on any id in `Tokenizer.eos_token_ids`. The rule, after llama.cpp's end-of-
generation set: the eos token; the ids a file declares besides it (GGUF `tokenizer.ggml.eot_token_id`
and `eom_token_id`, the `eos_token_id` of a directory's generation_config.json); and every special
token whose text is a known end-of-turn marker (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer, read_gguf_metadata

from thrifty.cache_dir import cache_dir
from thrifty.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")

# Texts of special tokens that end a turn, as llama.cpp lists them for its end-of-generation set.
END_OF_TURN_TOKENS = frozenset({
    "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>",
    "<|end_of_text|>", "<|return|>", "<|call|>", "<EOT>", "<end_of_utterance>",
})

# Converting a vocabulary this small takes milliseconds: a cache file would only be clutter.
MIN_VOCAB_TO_CACHE = 4096
_CACHE_FORMAT = 1  # bump when what the cache holds changes

# GGUF keys naming end-of-generation ids besides eos.
_DECLARED_EOS_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def default_cache_dir() -> Path:
    return cache_dir("tokenizers")


class Tokenizer:
    """A model's tokenizer: `encode`, `decode`, its special ids and its chat template."""

    def __init__(self, hf: PreTrainedTokenizerFast, *, name: str, declared_eos_ids: Sequence[int] = ()) -> None:
        self._hf = hf
        self.name = name
        self.eos_token_ids = _eos_token_ids(hf, declared_eos_ids)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, *, name: str | None = None, cache: bool = True) -> Tokenizer:
        """The tokenizer described by a GGUF file's `tokenizer.*` metadata.

        `name` is used in error messages (default: the file name). With `cache`, a large
        vocabulary's conversion is kept on disk, keyed by the file's path, size and mtime.
        """
        path = Path(path).expanduser().resolve()
        name = name or path.name
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {path}; check the path or run `thrifty models`")
        cache_files = _cache_files(path) if cache else None
        if cache_files is not None and (loaded := _load_cached(*cache_files)) is not None:
            hf, declared = loaded
            return cls(hf, name=name, declared_eos_ids=declared)

        metadata = _read_tokenizer_metadata(path)
        declared = [metadata[key] for key in _DECLARED_EOS_KEYS if key in metadata]
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
        try:
            backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
        except ValueError as error:
            raise UnsupportedModelError(f"cannot build the tokenizer of {path}: {error}") from error
        if cache_files is not None and metadata["tokenizer.ggml.tokens"] >= MIN_VOCAB_TO_CACHE:
            _store_cached(*cache_files, backend, {"tokenizer_config": tokenizer_config, "declared_eos_ids": declared})
        # As transformers' own GGUF path builds it: the converted backend plus the file's tokenizer
        # config (special tokens, add_bos_token, chat template). transformers may wrap the backend in
        # a model-specific subclass (GemmaTokenizer); the ids come from the backend all the same.
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)
        return cls(hf, name=name, declared_eos_ids=declared)

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike, *, name: str | None = None) -> Tokenizer:
        """The tokenizer of a Hugging Face model directory (tokenizer.json, tokenizer_config.json)."""
        path = Path(path).expanduser().resolve()
        name = name or path.name
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(
                f"{path} has no tokenizer.json; a Hugging Face model directory needs tokenizer.json and "
                "tokenizer_config.json (write them with `tokenizer.save_pretrained(dir)`)")
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load the tokenizer in {path}: {error}") from error
        return cls(hf, name=name, declared_eos_ids=_generation_config_eos_ids(path))

    # -- ids and text ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, a BOS first if the model wants one."""
        return self._hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self._hf.convert_ids_to_tokens(ids)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return len(self._hf)

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        """The eos token itself; generation stops on any of `eos_token_ids`."""
        return self._hf.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self._hf.pad_token_id

    # -- chat -----------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self._hf.chat_template or None

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The conversation as prompt text, rendered as transformers renders it.

        `chat_template` replaces the model's template; `template_kwargs` reach the template as
        variables (e.g. `tools=[...]`).
        """
        validate_messages(messages)
        template = chat_template or self.chat_template
        if template is None:
            raise InvalidRequestError(
                f"model {self.name} has no chat template (it is a base model); use generate with a plain "
                "prompt or pass a template with --chat-template FILE")
        try:
            return self._hf.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False,
                **template_kwargs)
        except jinja2.TemplateSyntaxError as error:
            raise InvalidRequestError(
                f"the chat template is not valid Jinja2 (line {error.lineno}: {error.message}); fix the "
                "template") from error
        except jinja2.TemplateError as error:  # e.g. raise_exception("roles must alternate")
            raise InvalidRequestError(
                f"the chat template of model {self.name} rejected the messages: {error}") from error


def validate_messages(messages: Any) -> None:
    """Raise InvalidRequestError unless `messages` is a non-empty list of {role, content: str} dicts."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(
            "messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(
                f"messages[{i}] is a {type(message).__name__}; each message must be a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"messages[{i}] has role {role!r}; use one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise InvalidRequestError(
                f"messages[{i}]['content'] must be a string, got {type(content).__name__}")


# -- helpers ------------------------------------------------------------------------------------


def _eos_token_ids(hf: PreTrainedTokenizerFast, declared: Sequence[int]) -> list[int]:
    """eos first, then the other end-of-generation ids in ascending order (rule: module docstring)."""
    eos = hf.eos_token_id
    others = set(declared)
    others.update(i for i, token in hf.added_tokens_decoder.items()
                  if token.special and token.content in END_OF_TURN_TOKENS)
    others.discard(eos)
    return ([eos] if eos is not None else []) + sorted(others)


def _generation_config_eos_ids(directory: Path) -> list[int]:
    file = directory / "generation_config.json"
    if not file.is_file():
        return []
    eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _read_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The file's metadata (string arrays as counts), checked to describe a tokenizer."""
    try:
        metadata, _ = read_gguf_metadata(str(path))
    except (ValueError, OSError) as error:
        raise ModelLoadError(f"cannot read {path} as a GGUF file ({error}); pass a valid .gguf file") from error
    if "tokenizer.ggml.tokens" not in metadata:
        raise ModelLoadError(
            f"{path} has no tokenizer in its metadata (tokenizer.ggml.tokens is missing); use a GGUF file "
            "converted with its tokenizer, e.g. by llama.cpp's convert_hf_to_gguf.py")
    return metadata


def _cache_files(path: Path) -> tuple[Path, Path]:
    """(tokenizer.json, meta.json) for this version of this file; the name starts with a hash of
    the path alone, so an entry for an older version can be found and replaced."""
    stat = path.stat()
    version = f"{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{tokenizers.__version__}|{_CACHE_FORMAT}"
    stem = f"{_digest(str(path))}-{_digest(version)}"
    directory = default_cache_dir()
    return directory / f"{stem}.tokenizer.json", directory / f"{stem}.meta.json"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load_cached(tokenizer_file: Path, meta_file: Path) -> tuple[PreTrainedTokenizerFast, list[int]] | None:
    if not (meta_file.is_file() and tokenizer_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **meta["tokenizer_config"])
        return hf, meta["declared_eos_ids"]
    except Exception as error:  # a damaged entry costs a rebuild, never a failure
        logger.warning("ignoring damaged tokenizer cache entry %s (%s); rebuilding it", meta_file, error)
        return None


def _store_cached(tokenizer_file: Path, meta_file: Path, backend: tokenizers.Tokenizer, meta: dict) -> None:
    """Write the entry atomically (meta last, as it marks the entry complete); drop older ones."""
    try:
        directory = tokenizer_file.parent
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(f"{tokenizer_file.name.split('-')[0]}-*"):
            if stale not in (tokenizer_file, meta_file):
                stale.unlink(missing_ok=True)
        _write_atomic(tokenizer_file, backend.to_str())
        _write_atomic(meta_file, json.dumps(meta))
    except OSError as error:
        logger.warning("could not cache the tokenizer in %s (%s); loading will stay slow", tokenizer_file.parent, error)


def _write_atomic(file: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    fd, temporary = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, file)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
