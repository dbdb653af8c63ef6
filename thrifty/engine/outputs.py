"""What the engine hands back for a request, cumulative and as deltas for streaming."""

from __future__ import annotations

from dataclasses import dataclass, field

from thrifty.engine.sampler import TokenLogprob


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str  # all text so far (held back while it might be the start of a stop string)
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort", None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""  # text added since the previous output for this request
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
