"""The engine: requests in, one batched model step at a time, outputs out."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from thrifty.catalog import DEFAULT_MODEL, resolve_model
from thrifty.engine.compiled_decode import ModelRecipe
from thrifty.engine.detokenizer import IncrementalDetokenizer
from thrifty.engine.model_runner import ModelRunner
from thrifty.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from thrifty.engine.sampler import Sampler, TokenLogprob
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.scheduler import SCHEDULING_POLICIES, ScheduledSequence, Scheduler
from thrifty.engine.sequence import Sequence
from thrifty.errors import InvalidRequestError, PromptTooLongError
from thrifty.kv.blocks import BlockManager
from thrifty.kv.cache import KVCache, check_kv_cache_dtype, pool_blocks
from thrifty.kv.compression import KVCompressor, KVSpec
from thrifty.loading.source import open_model_source
from thrifty.loading.tokenizer import Tokenizer
from thrifty.models.base import CausalLM
from thrifty.models.registry import load_model
from thrifty.quant.formats import WEIGHT_CHOICES, resolve_choice
from thrifty.spec.layer_skip import default_kept_layers, layer_skip_view
from thrifty.spec.model_drafter import ModelDrafter, TargetKV
from thrifty.spec.speculator import PROPOSERS, Speculator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_POOL_TOKENS = 16384


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL  # catalog name, GGUF file or Hugging Face directory
    device: str = "cpu"
    dtype: str = "float32"
    weights: str = "fp32"  # run format of matmul weights: auto|gguf|int8|int4|bf16|fp32 (thrifty.quant)
    max_model_len: int | None = None  # default: the model's context window
    kv_cache_tokens: int | None = None  # KV pool size in tokens ...
    kv_cache_bytes: int | None = None  # ... or in bytes (default: max(context, 16384) tokens)
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget; longer prompts are prefilled in chunks
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    chat_template: str | None = None  # overrides the model's own
    num_threads: int | None = None
    # Decode steps compiled ahead of time (AOTInductor, cached on disk, eager if building fails); off
    # by default because the first build takes a minute or two on a small CPU (thrifty.engine.compiled_decode)
    compile: bool = False
    # KV eviction for requests that do not choose (SamplingParams.kv_policy): policy name and budget
    kv_policy: str | None = None
    kv_budget: int | float | None = None  # tokens (int) or a fraction of the prompt (float)
    kv_policy_options: dict[str, object] | None = None
    kv_cache_dtype: str = "auto"  # KV cache storage: auto (the model's dtype) | int8 | kivi4 | kivi2 | gear4 | gear2
    show_progress: bool = False
    speculative: str | None = None  # default proposer for requests that do not choose: ngram|history|draft|layerskip
    num_speculative_tokens: int | None = None  # most draft tokens per sequence and step (None: the proposer's)
    speculative_adaptive: bool = True  # draft length from acceptance and step cost; plain decoding when it does not pay
    # The `draft` proposer's model (same tokenizer; default: the target's own file) and its run format,
    # by default the int4 copy of the target; it loads when a request first asks for it.
    speculative_draft_model: str | None = None
    speculative_draft_weights: str = "int4"
    speculative_layer_fraction: float = 0.5  # share of the target's layers the `layerskip` drafter runs
    speculative_draft_kv_tokens: int = 8192  # KV pool of a model drafter (its sequences stop drafting when full)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype {self.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidRequestError(f"device {self.device!r} is unknown; use cpu or cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidRequestError("device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
        if self.weights not in WEIGHT_CHOICES:
            raise InvalidRequestError(f"weights {self.weights!r} is unknown; use one of {', '.join(WEIGHT_CHOICES)}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise InvalidRequestError(f"scheduling policy {self.scheduling_policy!r} is unknown; "
                                      f"use one of {SCHEDULING_POLICIES}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be at least 1")
        if self.speculative not in (None, "off", *PROPOSERS):
            raise InvalidRequestError(f"speculative method {self.speculative!r} is unknown; "
                                      f"use one of {', '.join(PROPOSERS)} or off")
        if self.speculative_draft_weights not in WEIGHT_CHOICES:
            raise InvalidRequestError(f"speculative_draft_weights {self.speculative_draft_weights!r} is unknown; "
                                      f"use one of {', '.join(WEIGHT_CHOICES)}")
        if not 0 < self.speculative_layer_fraction < 1:
            raise InvalidRequestError("speculative_layer_fraction must be between 0 and 1 (exclusive)")
        if self.speculative_draft_kv_tokens < self.block_size:
            raise InvalidRequestError("speculative_draft_kv_tokens must hold at least one KV block")
        if self.num_speculative_tokens is not None and not 1 <= self.num_speculative_tokens <= 64:
            raise InvalidRequestError("num_speculative_tokens must be between 1 and 64")
        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.compile and self.kv_cache_dtype != "auto":
            raise InvalidRequestError("compile runs with the full-precision KV cache only; "
                                      f"drop --compile or use kv_cache_dtype auto instead of {self.kv_cache_dtype}")
        if self.compile and torch.device(self.device).type != "cpu":
            raise InvalidRequestError(f"compile builds CPU decode steps only; drop --compile on device {self.device}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidRequestError("max_model_len must be at least 2")


@dataclass
class _SequenceText:
    """Text bookkeeping of one sequence: detokenizer state, stop strings, what was already sent."""

    detokenizer: IncrementalDetokenizer
    text: str = ""
    sent_chars: int = 0
    sent_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    texts: list[_SequenceText]
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        config.validate()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]

        path = resolve_model(config.model)
        source = open_model_source(path)
        self.model_config = source.config
        self.model_name = config.model
        self.tokenizer = (Tokenizer.from_gguf(path, name=config.model) if source.format == "gguf"
                          else Tokenizer.from_pretrained_dir(path, name=config.model))
        self.weights = resolve_choice(config.weights, self.device)
        self.model = load_model(source, self.dtype, self.device, self.weights, self._progress("loading weights"))

        context = self.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or context, context)
        num_blocks = pool_blocks(self.model_config, self.dtype, config.block_size, config.kv_cache_tokens,
                                 config.kv_cache_bytes, default_tokens=max(self.max_model_len, DEFAULT_POOL_TOKENS),
                                 kv_cache_dtype=config.kv_cache_dtype, max_num_seqs=config.max_num_seqs)
        self.kv_cache = KVCache(self.model_config, num_blocks, config.block_size, self.dtype, self.device,
                                config.kv_cache_dtype, config.max_num_seqs)
        self.model.bind_kv_cache(self.kv_cache.layers)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.scheduling_policy)
        default_kv = None
        if config.kv_policy not in (None, "none"):
            if config.kv_budget is None:
                raise InvalidRequestError(f"kv_policy {config.kv_policy!r} needs a kv_budget")
            default_kv = KVSpec(config.kv_policy, config.kv_budget, dict(config.kv_policy_options or {}))
        self.kv_compressor = KVCompressor(self.kv_cache, self.block_manager, self.model_config, default_kv)
        self.runner = ModelRunner(self.model, config.block_size, self.device, self.kv_compressor.prepare)
        self.recipe = ModelRecipe(str(path), config.dtype, self.weights)  # how to rebuild the model elsewhere
        if config.compile:
            self.runner.compile_decode(self.recipe)
        self.sampler = Sampler(self.tokenizer.eos_token_ids)
        self.speculator = Speculator(self.block_manager, self.kv_cache.layers, self.tokenizer.eos_token_ids,
                                     self.max_model_len, config.speculative, config.num_speculative_tokens,
                                     config.speculative_adaptive,
                                     model_drafters={"draft": self._draft_model_drafter,
                                                     "layerskip": self._layer_skip_drafter})
        if config.speculative not in (None, "off"):
            self.speculator.proposer(config.speculative)
        self.runner.speculates = lambda seq: self.speculator.method(seq) is not None
        self.requests: dict[str, _Request] = {}

    def _progress(self, what: str) -> Callable[[Iterable], Iterable] | None:
        if not self.config.show_progress:
            return None
        return lambda items: tqdm(items, desc=what, unit=" tensors", leave=False)

    def _model_drafter(self, name: str, model: CausalLM, mirrored_layers: list[int] | None = None,
                       recipe: ModelRecipe | None = None) -> ModelDrafter:
        """A drafter running `model`; `mirrored_layers` (the target layer each of its layers computes,
        when it runs the target's own weights) lets it copy the target's KV instead of reading prompts.
        With `compile`, its decode steps are compiled from `recipe` (how `model` was loaded); without
        a recipe it runs eagerly."""
        num_blocks = max(1, self.config.speculative_draft_kv_tokens // self.config.block_size)
        target_kv = None if mirrored_layers is None else TargetKV(self.kv_cache.layers, self.block_manager,
                                                                  mirrored_layers)
        drafter = ModelDrafter(name, model, num_blocks, self.config.block_size, self.dtype, self.device, target_kv)
        if self.config.compile and recipe is not None:  # a drafter's passes are small plain decoding steps
            drafter.runner.compile_decode(recipe)
        return drafter

    def _draft_model_drafter(self) -> ModelDrafter:
        """The `draft` proposer: a separate model (by default the target's file in a cheaper run format)."""
        config = self.config
        path = resolve_model(config.speculative_draft_model or config.model)
        source = open_model_source(path)
        if source.config.vocab_size != self.model_config.vocab_size:
            raise InvalidRequestError(
                f"the draft model {path} has a vocabulary of {source.config.vocab_size} tokens but the target has "
                f"{self.model_config.vocab_size}; a draft model must share the target's tokenizer")
        weights = resolve_choice(config.speculative_draft_weights, self.device)
        model = load_model(source, self.dtype, self.device, weights, self._progress("loading draft model"))
        own_weights = path == resolve_model(config.model)  # the target's file in another run format
        recipe = ModelRecipe(str(path), self.config.dtype, weights)
        return self._model_drafter("draft", model, list(range(self.model_config.num_layers)) if own_weights else None,
                                   recipe)

    def _layer_skip_drafter(self) -> ModelDrafter:
        """The `layerskip` proposer: the target itself running a subset of its layers."""
        kept = default_kept_layers(self.model_config.num_layers, self.config.speculative_layer_fraction)
        return self._model_drafter("layerskip", layer_skip_view(self.model, kept), kept,
                                   replace(self.recipe, kept_layers=kept))

    # -- requests -----------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                                      f"[0, {self.model_config.vocab_size}); tokenize with this model's tokenizer")
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenize_prompt(prompt)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        self._check_fits(len(token_ids), params)
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids {params.stop_token_ids} include ids outside the "
                                      f"vocabulary [0, {vocab}); use this model's token ids")
        self.kv_compressor.resolve(params)
        method = params.speculative or self.config.speculative
        if method not in (None, "off"):
            self.speculator.proposer(method)  # a draft model loads here, so its errors reach this request
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs = [Sequence(request_id, i, token_ids, params, arrival) for i in range(params.n)]
        texts = [_SequenceText(IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens))
                 for _ in seqs]
        self.requests[request_id] = _Request(request_id, prompt if isinstance(prompt, str) else None,
                                             token_ids, params, seqs, texts, RequestMetrics(arrival))
        for seq in seqs:
            self.kv_compressor.add(seq)
            self.scheduler.add(seq)

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        """Refuse what can never complete: over the context window, or over the whole KV pool."""
        if prompt_len >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {prompt_len} tokens but the context window is {self.max_model_len} "
                f"(room is needed for at least one new token); shorten the prompt")
        wanted = prompt_len + (params.max_tokens or 1)
        if wanted > self.max_model_len:
            raise PromptTooLongError(
                f"this model's context window is {self.max_model_len} tokens, but {wanted} were asked for "
                f"({prompt_len} in the prompt, {params.max_tokens} to generate); lower max_tokens "
                f"or shorten the prompt")
        capacity = self.block_manager.capacity_tokens
        if wanted > capacity:
            raise PromptTooLongError(
                f"{wanted} tokens ({prompt_len} prompt + {params.max_tokens or 1} new) do not fit the KV pool "
                f"of {capacity} tokens; raise kv_cache_tokens / kv_cache_bytes or lower max_tokens")

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. Returns whether it was running."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish("abort")
                self.scheduler.finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def progress(self, request_id: str) -> tuple[int, int]:
        """(prompt tokens computed, prompt tokens) of a request's first sequence, for progress bars."""
        seq = self.requests[request_id].seqs[0]
        return min(seq.num_computed_tokens, seq.prompt_len), seq.prompt_len

    # -- stepping -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batched forward pass; return outputs of the requests that moved."""
        self.speculator.propose(self.scheduler.running)
        schedule = self.scheduler.schedule()
        if not schedule.scheduled:
            return []
        started = time.perf_counter()
        logits = self.runner.execute(schedule.scheduled)
        self.speculator.record_step(schedule.scheduled, time.perf_counter() - started)
        sampled: list[ScheduledSequence] = []
        for item in schedule.scheduled:
            item.seq.num_computed_tokens += item.num_tokens
            self.block_manager.commit(item.seq)  # a no-op while draft slots are reserved
            if item.seq.num_computed_tokens == item.seq.num_tokens:
                sampled.append(item)
        now = time.monotonic()
        touched: dict[str, _Request] = {}
        for item, (tokens, logprobs) in zip(sampled, self.speculator.sample(sampled, logits, self.sampler)):
            seq = item.seq
            request = self.requests[seq.request_id]
            appended = 0
            for token, logprob in zip(tokens, logprobs):
                seq.token_ids.append(token)
                appended += 1
                self._process_token(request, seq, token, logprob)
                if seq.is_finished:
                    break
            self.speculator.settle(item, appended)
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            if seq.is_finished:
                self.scheduler.finish(seq)
            touched[request.request_id] = request
        self.kv_compressor.after_step(schedule.scheduled)
        outputs = []
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = now
                request.metrics.num_preemptions = sum(s.num_preemptions for s in request.seqs)
                del self.requests[request.request_id]
            outputs.append(self._output(request))
        return outputs

    def _process_token(self, request: _Request, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        params, state = request.params, request.texts[seq.index]
        if logprob is not None:
            state.logprobs.append(logprob)
        may_stop = seq.num_output_tokens >= params.min_tokens
        if may_stop and not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            seq.finish("stop")
        elif may_stop and token in params.stop_token_ids:
            seq.finish("stop", token)
        delta = state.detokenizer.add(token)
        state.text += delta
        if params.stop and may_stop and not seq.is_finished:
            longest = max(len(s) for s in params.stop)
            search_from = max(0, len(state.text) - len(delta) - longest + 1)
            hits = [(state.text.find(s, search_from), s) for s in params.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                index, stop = min(hits)
                state.text = state.text[:index + (len(stop) if params.include_stop_str_in_output else 0)]
                seq.finish("stop", stop)
                return
        if not seq.is_finished:
            if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
                seq.finish("length")
            elif seq.num_tokens >= self.max_model_len:
                seq.finish("length")
        if seq.is_finished:
            state.text += state.detokenizer.flush()

    def _output(self, request: _Request) -> RequestOutput:
        completions = []
        hold = max((len(s) for s in request.params.stop), default=1) - 1
        for seq, state in zip(request.seqs, request.texts):
            visible = state.text if seq.is_finished or not hold else state.text[:max(0, len(state.text) - hold)]
            output_ids = seq.output_token_ids
            completions.append(CompletionOutput(
                index=seq.index, text=visible, token_ids=output_ids,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                logprobs=list(state.logprobs) if request.params.logprobs is not None else None,
                delta_text=visible[state.sent_chars:], delta_token_ids=output_ids[state.sent_tokens:]))
            state.sent_chars, state.sent_tokens = len(visible), len(output_ids)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             request.finished, request.metrics,
                             num_cached_prompt_tokens=request.seqs[0].num_prefix_cache_hits)

    # -- introspection ----------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        return {**self.speculator.stats(),
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": self.block_manager.num_blocks,
            "kv_blocks_free": self.block_manager.num_free_blocks,
            "kv_blocks_used": self.block_manager.num_used_blocks,
            "kv_blocks_side_store": self.block_manager.num_side_blocks,  # MiKV's demoted tokens, within used
            "num_preemptions": self.scheduler.num_preemptions,
        }
