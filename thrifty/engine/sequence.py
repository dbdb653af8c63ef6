"""One sequence being generated: its tokens, its place in the KV cache, its state."""

from __future__ import annotations

import enum
import itertools
import time
from typing import TYPE_CHECKING

import torch

from thrifty.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from thrifty.spec.draft import Draft

_sequence_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A prompt and the tokens generated after it.

    Two counters describe progress and they differ once a KV policy evicts tokens:
    `num_computed_tokens` is how many of `token_ids` the model has processed (the next
    token's RoPE position), `num_cached_slots` is how many KV slots the sequence holds.
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float | None = None) -> None:
        self.seq_id = next(_sequence_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions this is
        self.params = params
        self.prompt_len = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_slots = 0
        self.num_preemptions = 0
        self.num_prefix_cache_hits = 0  # prompt tokens found in the prefix cache at first admission
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None
        self.output_logprobs: list[dict] = []
        self.generator: torch.Generator | None = None
        self.draft: Draft | None = None  # speculative tokens proposed for the coming step
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + index)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def in_prefill(self) -> bool:
        """True while more than the newest token still has to go through the model."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: lower priority value first, then arrival, then creation."""
        return (self.params.priority, self.arrival_time, self.seq_id)
