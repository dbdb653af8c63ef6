"""The offline entry point: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence as SequenceABC

from tqdm import tqdm

from thrifty.catalog import DEFAULT_MODEL
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.outputs import RequestOutput
from thrifty.engine.sampling_params import SamplingParams
from thrifty.errors import InvalidRequestError

Message = dict[str, str]
Prompt = str | list[int]


class LLM:
    """A model loaded for offline generation. Keyword arguments are `EngineConfig` fields."""

    def __init__(self, model: str = DEFAULT_MODEL, **engine_options: object) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))  # type: ignore[arg-type]
        self._request_ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | SequenceABC[Prompt],
                 sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete every prompt (continuously batched); outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params = self._params_per_prompt(sampling_params, len(prompts))
        ids: list[str] = []
        try:
            for prompt, sp in zip(prompts, params):
                ids.append(self._submit(prompt, sp))
        except Exception:
            for request_id in ids:  # all or nothing: do not leave half a batch in the engine
                self.engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[i] for i in ids]

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation or to each of several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.render_chat(c, chat_template, add_generation_prompt) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def render_chat(self, messages: list[Message], chat_template: str | None = None,
                    add_generation_prompt: bool = True) -> str:
        template = chat_template or self.engine.config.chat_template
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  chat_template=template)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               on_prefill_progress: Callable[[int, int], None] | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that adds text; the last one has finished=True.

        Each output's `delta_text` is the new text, correct across multi-byte characters and
        word boundaries. Breaking out of the loop aborts the request and frees its KV blocks.
        `on_prefill_progress(done, total)` is called after each step of a chunked prefill.
        """
        request_id = self._submit(prompt, sampling_params or SamplingParams())
        prefilling = on_prefill_progress is not None
        try:
            while True:
                outputs = self.engine.step()
                if prefilling and request_id in self.engine.requests:
                    done, total = self.engine.progress(request_id)
                    on_prefill_progress(done, total)
                    prefilling = done < total
                for output in outputs:
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            self.engine.abort_request(request_id)

    def _submit(self, prompt: Prompt, params: SamplingParams) -> str:
        request_id = str(next(self._request_ids))
        self.engine.add_request(request_id, prompt, params)
        return request_id

    @staticmethod
    def _params_per_prompt(params: SamplingParams | SequenceABC[SamplingParams] | None,
                           count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise InvalidRequestError(f"got {len(params)} SamplingParams for {count} prompts; give one, or one each")
        return params
