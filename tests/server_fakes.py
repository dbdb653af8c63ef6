"""A stand-in for LLMEngine with the same interface, so server plumbing (queue limits, drain,
signals, auth) is tested in milliseconds without a model.

Run as a module it serves itself over HTTP: `python -m tests.server_fakes PORT [STEP_SECONDS]`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from thrifty.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from thrifty.engine.sampling_params import SamplingParams
from thrifty.errors import InvalidRequestError, PromptTooLongError


class FakeTokenizer:
    """One token per character: id = code point."""

    vocab_size = 0x110000

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            chat_template: str | None = None) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


@dataclass
class FakeConfig:
    max_num_seqs: int = 4
    chat_template: str | None = None


@dataclass
class _Req:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    tokens: list[list[int]] = field(default_factory=list)


class FakeEngine:
    """Generates "abcd..." one letter per step per sequence, `step_seconds` per step; one KV block per request."""

    def __init__(self, step_seconds: float = 0.0, max_num_seqs: int = 4, max_model_len: int = 256) -> None:
        self.config = FakeConfig(max_num_seqs=max_num_seqs)
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.step_seconds = step_seconds
        self.requests: dict[str, _Req] = {}
        self.num_blocks = 32

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        if len(ids) + (params.max_tokens or 1) > self.max_model_len:
            raise PromptTooLongError(f"{len(ids)} + {params.max_tokens} tokens exceed {self.max_model_len}")
        self.requests[request_id] = _Req(request_id, ids, params, RequestMetrics(arrival_time or time.monotonic()),
                                         [[] for _ in range(params.n)])

    def abort_request(self, request_id: str) -> bool:
        return self.requests.pop(request_id, None) is not None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_seconds)
        outputs = []
        for req in list(self.requests.values())[:self.config.max_num_seqs]:
            limit = req.params.max_tokens or 8
            for seq in req.tokens:
                seq.append(ord("a") + len(seq) % 26)
            done = len(req.tokens[0]) >= limit
            now = time.monotonic()
            req.metrics.first_token_time = req.metrics.first_token_time or now
            if done:
                req.metrics.finished_time = now
                del self.requests[req.request_id]
            outputs.append(RequestOutput(
                req.request_id, None, req.prompt_ids,
                [CompletionOutput(index=i, text=self.tokenizer.decode(seq), token_ids=list(seq),
                                  finish_reason="length" if done else None, delta_text=chr(seq[-1]),
                                  delta_token_ids=[seq[-1]]) for i, seq in enumerate(req.tokens)],
                done, req.metrics))
        return outputs

    def stats(self) -> dict[str, int]:
        used = len(self.requests)
        return {"num_running": min(used, self.config.max_num_seqs),
                "num_waiting": max(0, used - self.config.max_num_seqs),
                "kv_blocks_total": self.num_blocks, "kv_blocks_free": self.num_blocks - used,
                "kv_blocks_used": used, "num_preemptions": 0}


if __name__ == "__main__":
    from thrifty.server.launch import serve

    port, step = int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
    serve(FakeEngine(step_seconds=step), "fake", "127.0.0.1", port, drain_timeout=30, log_level="warning")
