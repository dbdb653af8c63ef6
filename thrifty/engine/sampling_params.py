"""Per-request generation settings, validated when they are made."""

from __future__ import annotations

from dataclasses import dataclass, field

from thrifty.errors import InvalidRequestError

MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5
SPECULATIVE_METHODS = (None, "off", "ngram", "history", "draft", "layerskip")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, in the spirit of vLLM's class of the same name.

    temperature 0 means greedy. top_k <= 0 and top_p = 1 and min_p = 0 disable those filters.
    Lower `priority` values are scheduled first when the engine uses priority scheduling.
    """

    n: int = 1
    max_tokens: int | None = 256  # None: until the context window is full
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # how many top alternatives to report per generated token
    skip_special_tokens: bool = True
    priority: int = 0
    # Speculative decoding: "ngram" (prompt lookup), "history" (shared pool, token trees), "off",
    # or None for the engine's default; num_speculative_tokens caps the draft (None: engine default).
    speculative: str | None = None
    num_speculative_tokens: int | None = None
    # KV-cache eviction (thrifty.kv.policies); None: the engine's default policy.
    kv_policy: str | None = None  # a policy name, or "none" to opt out of an engine default
    kv_budget: int | float | None = None  # KV slots to keep: tokens (int) or a fraction of the prompt (float)
    kv_policy_options: dict[str, object] = field(default_factory=dict)  # e.g. {"window_size": 16} for snapkv

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self._validate()

    @property
    def greedy(self) -> bool:
        # Temperatures this small overflow the softmax; like vLLM, treat them as greedy.
        return self.temperature < GREEDY_TEMPERATURE

    def _validate(self) -> None:
        def bad(name: str, value: object, rule: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name}={value!r} is invalid: {rule}.")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", self.n, "it must be an integer >= 1")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "it must be an integer >= 1, or None for no limit")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "it must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"it must not exceed max_tokens={self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", self.temperature, "it must be between 0 (greedy) and 100")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "it must be in (0, 1]; use 1 to disable nucleus sampling")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", self.top_k, "it must be an integer; 0 or -1 disables top-k")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "it must be in [0, 1]; use 0 to disable")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", self.repetition_penalty, "it must be in (0, 10]; 1 disables it")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", self.presence_penalty, "it must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", self.frequency_penalty, "it must be in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise bad("seed", self.seed, "it must be a non-negative integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", self.stop, "stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "token ids must be non-negative integers")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", self.logprobs, f"it must be between 0 and {MAX_LOGPROBS}")
        if not isinstance(self.priority, int):
            raise bad("priority", self.priority, "it must be an integer (lower runs first)")
        if self.speculative not in SPECULATIVE_METHODS:
            raise bad("speculative", self.speculative,
                      f"use one of {', '.join(m for m in SPECULATIVE_METHODS if m)}, or leave it unset")
        if self.num_speculative_tokens is not None and (
                not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= 64):
            raise bad("num_speculative_tokens", self.num_speculative_tokens, "it must be an integer in [1, 64]")
        self._validate_kv()

    def _validate_kv(self) -> None:
        from thrifty.kv.compression import check_budget  # the kv package imports this module
        from thrifty.kv.policies import POLICIES, make_policy

        if self.kv_policy is not None and self.kv_policy != "none":
            make_policy(self.kv_policy, self.kv_policy_options)
        elif self.kv_policy_options:
            raise InvalidRequestError("kv_policy_options were given without a kv_policy; "
                                      f"name one of {', '.join(POLICIES)}")
        if self.kv_budget is not None:
            check_budget(self.kv_budget)
