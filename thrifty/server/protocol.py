"""OpenAI API request and response bodies (the subset thrifty serves), as pydantic models.

Requests are parsed strictly (a string where a number belongs is an error, as with OpenAI),
while fields this server does not know are accepted and ignored with a logged warning, as
vLLM's server does, so that clients sending newer OpenAI fields keep working.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from thrifty.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from thrifty.errors import InvalidRequestError

MAX_N = 128  # as OpenAI
# Temperatures below this sample greedily, as in vLLM: dividing logits by a near-zero temperature
# overflows to inf and the sampler would see NaN probabilities.
MIN_TEMPERATURE = 1e-5
MAX_PROMPTS = 256  # prompts in one /v1/completions batch
INT64 = 2**63


# Each policy option's type and the values a client may set. A bad value would otherwise reach the
# engine step, where it fails every request in the batch, so the server checks them before admission.
KV_POLICY_OPTION_RANGES: dict[str, tuple[type, float, float, bool]] = {
    # name: (type, low, high, low is exclusive)
    "sinks": (int, 0, 4096, False),
    "recent_ratio": (float, 0.0, 1.0, False),
    "window_size": (int, 1, 4096, False),
    "kernel_size": (int, 1, 255, False),
    "tau": (float, 0.0, 1e6, True),
    "seed": (int, -INT64, INT64 - 1, False),
    "pooling": (str, 0, 0, False),
    "beta": (float, 1.0, 1e6, False),
    "threshold_ema": (float, 0.0, 1.0, False),
    "bits": (int, 2, 4, False),  # mikv (the policy refuses 3)
    "importance": (str, 0, 0, False),
    "group_size": (int, 1, 4096, False),
}


def check_kv_policy_options(policy: str | None, options: object) -> None:
    """Refuse (400) kv_policy_options that are not a JSON object of known options with valid values."""
    from thrifty.kv.policies import POLICIES, make_policy, policy_options

    if not isinstance(options, dict):
        raise InvalidRequestError("kv_policy_options must be a JSON object such as {\"window_size\": 16}")
    if not options:
        return
    if policy is None or policy == "none" or policy not in POLICIES:
        # the server's default policy takes no per-request options; an unknown name gets its own message
        if policy is None or policy == "none":
            raise InvalidRequestError("kv_policy_options need a kv_policy in the same request; "
                                      f"name one of {', '.join(POLICIES)}")
        make_policy(policy)  # raises the unknown-policy error
    allowed = policy_options(policy)
    for name, value in options.items():
        if name not in allowed:
            raise InvalidRequestError(f"kv_policy_options {name!r} does not apply to {policy}; "
                                      f"its options: {', '.join(allowed) or 'none'}")
        kind, low, high, exclusive = KV_POLICY_OPTION_RANGES.get(name, (None, 0, 0, False))
        if kind is None:  # an option added to a policy without a range here: refuse rather than guess
            raise InvalidRequestError(f"kv_policy_options {name!r} cannot be set per request on this server")
        if kind is str:
            if not isinstance(value, str):
                raise InvalidRequestError(f"kv_policy_options {name!r} must be a string, got {value!r:.40}")
            continue
        number_ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not number_ok:
            raise InvalidRequestError(f"kv_policy_options {name!r} must be {'an integer' if kind is int else 'a number'}"
                                      f", got {value!r:.40}")
        if (isinstance(value, float) and math.isnan(value)) or (value <= low if exclusive else value < low) or value > high:
            opening, spec = "(" if exclusive else "[", "d" if kind is int else "g"
            raise InvalidRequestError(f"kv_policy_options {name!r} must be in {opening}{low:{spec}}, {high:{spec}}], "
                                      f"got {value!r:.40}")
    make_policy(policy, options)  # the policy's own checks (e.g. snapkv pooling, odd kernel_size)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions that become SamplingParams."""

    model: str | None = None  # optional, as in vLLM: the one served model by default
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    # thrifty's own options, sent by the official client as `extra_body` (vLLM's names where vLLM has them).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    kv_policy: str | None = None  # KV eviction: a policy name, or "none" to opt out of the server's default
    kv_budget: int | float | None = None  # KV slots kept: tokens (int) or a fraction of the prompt (float)
    kv_policy_options: dict[str, Any] | None = None
    speculative: str | None = None  # "ngram", "history", "draft", "layerskip" or "off"; unset: the server's default
    num_speculative_tokens: int | None = None

    def check_supported(self, vocab_size: int) -> None:
        """Refuse, with a reason, what the OpenAI API has but this server cannot do."""
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported by this server; remove it")
        if self.kv_policy_options is not None:
            check_kv_policy_options(self.kv_policy, self.kv_policy_options)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true")
        bad_ids = [t for t in self.stop_token_ids or [] if not 0 <= t < vocab_size]
        if bad_ids:
            raise InvalidRequestError(f"stop_token_ids {bad_ids[:5]} are outside the vocabulary [0, {vocab_size})")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's SamplingParams; InvalidRequestError (400) if a value is out of range."""
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else
            0.0 if 0 <= self.temperature < MIN_TEMPERATURE else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed, stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, priority=self.priority,
            kv_policy=self.kv_policy, kv_budget=self.kv_budget,
            kv_policy_options=dict(self.kv_policy_options or {}), speculative=self.speculative,
            num_speculative_tokens=self.num_speculative_tokens)

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self, vocab_size: int) -> None:
        super().check_supported(vocab_size)
        if self.suffix:
            raise InvalidRequestError("suffix (fill-in-the-middle) is not supported; remove it")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported; leave it out")
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError("echo together with logprobs is not supported (prompt logprobs are not "
                                      "computed); drop one of them")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        prompts: list[Any] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise InvalidRequestError("prompt is empty; give a string, a list of strings or token ids")
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequestError(f"{len(prompts)} prompts in one request; send at most {MAX_PROMPTS}")
        return prompts


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def for_template(self, index: int) -> dict[str, str]:
        """The message as chat templates expect it: role and plain-text content."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text":
                    raise InvalidRequestError(f"messages[{index}] has a content part of type {part.type!r}; "
                                              "this server only takes text parts")
                if part.text is None:
                    raise InvalidRequestError(f"messages[{index}] has a text part without 'text'")
                texts.append(part.text)
            content = "\n".join(texts)
        # OpenAI's "developer" role is the system role under a new name.
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def check_supported(self, vocab_size: int) -> None:
        super().check_supported(vocab_size)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true")
        if self.tools:
            raise InvalidRequestError("tool calling is not supported by this server; remove tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice is not supported by this server; remove it")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise InvalidRequestError("only response_format {\"type\": \"text\"} is supported")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# -- responses ----------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "thrifty"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends only what changed: {"content": "..."}, and {} in the closing chunk.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
