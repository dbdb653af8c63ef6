"""The shared eviction mechanism: keep each sequence within its KV budget and free what it drops.

Per request a policy (thrifty.kv.policies) scores the cached tokens; this module does the rest,
the same for every policy:

- When: at the end of prefill (prompt compression, after the last chunk, so chunked prefill
  sees the whole prompt) and during decode whenever a sequence holds `budget + block_size`
  slots, so each compaction frees at least one block and decode steps between them cost
  nothing extra. A preempted sequence is recomputed from scratch and compressed again.
- What: per layer and per KV head, the `window` newest slots plus the best-scoring others, up
  to `budget` slots. Every head keeps the same number of slots, so the sequence keeps one
  block table and one slot count: head h of slot i may hold a different token than head h'.
  Keys are cached after RoPE, so a moved token keeps its position; `num_computed_tokens`
  (the next RoPE position) and `num_cached_slots` simply part ways.
- Per-layer budgets (PyramidKV, D2O): the block table stays shared, sized for the largest layer
  budget; layer l keeps its own n_l slots at the front and filler after them, which its attention
  masks out (`LayerLengths`) until the next compaction. New tokens go after the shared slots, so
  every layer sees them. The memory freed is therefore down to the largest layer budget, not the
  mean; sequences without per-layer budgets carry no mask at all.
- Merging (D2O): before the kept slots are written, the policy may fold evicted tokens into them.
- Demoting (MiKV): a policy that `demotes` has its evicted tokens quantized into a per-sequence
  low-precision side store (thrifty.kv.quant.lowbit) instead of dropped; attention reads them back
  next to the kept slots. Only tokens a compaction evicts go there, and compactions run after
  speculative drafts are settled, so the store never holds a speculative token. Its bytes are
  charged to the pool as whole blocks the sequence holds outside its block table (`_charge`), so
  `--kv-cache-tokens` / `--kv-cache-memory` bound it too. It is dropped, and its blocks returned,
  when the sequence finishes or is preempted (the recomputation compresses, and demotes, again).
- How: gather the kept K/V (and the policy's attention statistics) for every layer, let the
  block manager free the tail and swap shared prefix blocks for private ones (copy-on-write;
  the shared prefix is never written), then write the kept slots to the front.

Models with sliding-window layers are refused: their attention mask assumes slot index ==
position, which eviction breaks.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

from thrifty.config import ModelConfig
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.scheduler import ScheduledSequence
from thrifty.engine.sequence import Sequence
from thrifty.errors import InvalidRequestError
from thrifty.kv.blocks import BlockManager
from thrifty.kv.cache import KVCache
from thrifty.kv.policies import KVPolicy, ScoreInputs, make_policy
from thrifty.kv.quant import DenseKV
from thrifty.kv.quant.lowbit import LowPrecisionTokens
from thrifty.models.paged_attention import AttentionObserver, LayerLengths


@dataclass
class KVSpec:
    """A request's resolved choice: which policy, with what options, at what budget."""

    policy: str
    budget: int | float  # tokens (int) or a fraction of the prompt (float in (0, 1])
    options: dict[str, object] = field(default_factory=dict)

    def budget_tokens(self, prompt_len: int) -> int:
        if isinstance(self.budget, float):
            return max(1, math.ceil(self.budget * prompt_len))
        return self.budget


def check_budget(budget: object) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise InvalidRequestError(f"kv_budget={budget!r} is invalid: give a token count (int >= 1) "
                                  "or a fraction of the prompt (float in (0, 1])")
    if isinstance(budget, int) and budget < 1:
        raise InvalidRequestError(f"kv_budget={budget} is invalid: a token budget must be at least 1")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise InvalidRequestError(f"kv_budget={budget} is invalid: a fractional budget must be in (0, 1]; "
                                  "give an int for a number of tokens")


def keep_indices(scores: torch.Tensor, budget: int, window: int, pinned: int = 0) -> torch.Tensor:
    """The rule every policy shares: the `window` newest slots, then the best scores, per head.

    scores [kv_heads, N] -> sorted slot indices [kv_heads, budget] (oldest first, so order is kept).
    The first `pinned` slots are always kept (a shared prefix that cannot be copied).
    """
    scores = scores.float().clone()
    if window:
        scores[:, scores.shape[1] - window:] = float("inf")
    scores[:, :pinned] = float("inf")
    return scores.topk(budget, dim=-1).indices.sort(dim=-1).values


@dataclass
class _SeqState:
    policy: KVPolicy
    budget: int
    num_layers: int
    target: int = 0  # slots kept by the last compaction (above budget when a shared prefix was pinned)
    stats: list[torch.Tensor | None] = field(default_factory=list)
    positions: list[torch.Tensor | None] = field(default_factory=list)  # per layer [kv_heads, slots]
    computed: int = 0  # num_computed_tokens at the end of the last step (drops on preemption)
    prefill_done: bool = False
    layer_budgets: list[int] | None = None  # per layer, fixed by the first compaction
    lengths: LayerLengths | None = None  # what each layer kept at the last compaction, if layers differ
    demoted: LowPrecisionTokens | None = None  # evicted tokens in low precision (policies that demote)

    def reset(self) -> None:
        self.stats = [None] * self.num_layers
        self.positions = [None] * self.num_layers
        self.computed = 0
        self.prefill_done = False
        self.target = self.budget
        self.layer_budgets = None
        self.lengths = None
        self.demoted = None
        self.policy.reset()


@dataclass
class CompressionStats:
    compactions: int = 0
    evicted_slots: int = 0
    pinned: int = 0  # compactions that kept a shared prefix in place for want of blocks to copy it into
    demoted_slots: int = 0  # of the evicted slots, those kept in low precision instead of dropped
    demoted_dropped: int = 0  # of the demoted slots, those dropped later because the pool had no room


class KVCompressor:
    def __init__(self, kv_cache: KVCache, blocks: BlockManager, config: ModelConfig,
                 default: KVSpec | None = None) -> None:
        self.kv_cache = kv_cache
        self.device = kv_cache.stores[0].device
        self.blocks = blocks
        self.num_layers = config.num_layers
        self.num_kv_heads = config.num_kv_heads
        self.sliding = [i for i in range(config.num_layers) if config.layer_sliding_window(i) is not None]
        self.default = default
        self.stats = CompressionStats()
        self._states: weakref.WeakKeyDictionary[Sequence, _SeqState] = weakref.WeakKeyDictionary()
        self._demoting: weakref.WeakSet[Sequence] = weakref.WeakSet()  # sequences holding a side store
        if default is not None:
            self.resolve(SamplingParams())

    # -- requests -------------------------------------------------------------------------

    def resolve(self, params: SamplingParams) -> KVSpec | None:
        """The request's policy (its own, else the engine default); raises on invalid combinations."""
        default = self.default
        name = params.kv_policy if params.kv_policy is not None else (default.policy if default else None)
        if name is None or name == "none":
            if params.kv_budget is not None and name is None:
                raise InvalidRequestError("kv_budget was given without a kv_policy; name one "
                                          "(e.g. kv_policy='snapkv') or drop kv_budget")
            return None
        budget = params.kv_budget if params.kv_budget is not None else (default.budget if default else None)
        if budget is None:
            raise InvalidRequestError(f"kv_policy={name!r} needs a kv_budget (tokens, or a fraction of the prompt)")
        check_budget(budget)
        options = params.kv_policy_options if params.kv_policy is not None else (default.options if default else {})
        make_policy(name, options)  # validates the options
        if self.sliding:
            raise InvalidRequestError(
                f"kv_policy {name!r} cannot be used with this model: layers {self.sliding[:4]} use sliding-window "
                "attention, whose mask assumes slot index == position, which eviction breaks")
        return KVSpec(name, budget, dict(options))

    def add(self, seq: Sequence) -> None:
        spec = self.resolve(seq.params)
        if spec is None:
            return
        budget = spec.budget_tokens(seq.prompt_len)
        max_tokens = seq.params.max_tokens
        if max_tokens is not None and budget >= seq.prompt_len + max_tokens:
            return  # the sequence can never exceed its budget: no scores, no state, full-cache output
        state = _SeqState(make_policy(spec.policy, spec.options), budget, self.num_layers)
        state.reset()
        self._states[seq] = state

    # -- per step -------------------------------------------------------------------------

    def prepare(self, seq: Sequence) -> tuple[AttentionObserver | None, LayerLengths | None,
                                              LowPrecisionTokens | None]:
        """Called by the model runner before a step: the sequence's attention observer, per-layer
        lengths and demoted tokens, each None when not needed."""
        state = self._states.get(seq)
        if state is None:
            return None, None, None
        if seq.num_computed_tokens < state.computed:
            state.reset()  # preempted: it is being recomputed, so it is compressed again afterwards
        if not state.policy.needs_attention:
            return None, state.lengths, state.demoted
        return lambda layer, probs: self._observe(state, layer, probs), state.lengths, state.demoted

    @property
    def demoted_nbytes(self) -> int:
        """Bytes held by the low-precision side stores of all sequences."""
        states = [self._states.get(seq) for seq in self._demoting]
        return sum(state.demoted.nbytes for state in states if state is not None and state.demoted is not None)

    def _observe(self, state: _SeqState, layer: int, probs: torch.Tensor) -> None:
        heads, q, ctx = probs.shape
        probs = probs.view(self.num_kv_heads, heads // self.num_kv_heads, q, ctx).mean(dim=1)
        stat = state.stats[layer]
        if stat is not None:
            # Columns of slots held before this step (rolled-back slots dropped), zeros for the new ones.
            stat = torch.nn.functional.pad(stat[..., :ctx - q], (0, q))
        state.stats[layer] = state.policy.observe(stat, probs)

    def after_step(self, scheduled: list[ScheduledSequence]) -> None:
        """Called by the engine after each step: compress sequences at end of prefill or over budget."""
        self.kv_cache.sync(self.blocks, [item.seq for item in scheduled])  # a quantized cache seals full blocks
        # finished, aborted or preempted: its demoted tokens go (their blocks went with BlockManager.free)
        for seq in list(self._demoting):
            state = self._states.get(seq)
            if state is None or seq.is_finished or seq.num_computed_tokens < state.computed:
                if state is not None:
                    state.demoted = None
                self._demoting.discard(seq)
        for item in scheduled:
            seq = item.seq
            state = self._states.get(seq)
            if state is None:
                continue
            if seq.is_finished:
                del self._states[seq]
                continue
            state.computed = seq.num_computed_tokens
            if seq.in_prefill:
                continue  # a mid-prompt chunk: compress once the whole prompt is in
            slots = seq.num_cached_slots
            just_prefilled = not state.prefill_done
            state.prefill_done = True
            if slots > state.budget and (just_prefilled or slots >= state.target + self.blocks.block_size):
                self.compress(seq, state)

    # -- the mechanism --------------------------------------------------------------------

    def _slot_ids(self, seq: Sequence) -> torch.Tensor:
        bs = self.blocks.block_size
        table = torch.tensor(seq.block_table, dtype=torch.long, device=self.device)
        return (table[:, None] * bs + torch.arange(bs, device=self.device)).flatten()[:seq.num_cached_slots]

    def _positions(self, seq: Sequence, state: _SeqState, layer: int) -> torch.Tensor:
        """Original token position of every slot, per head: tracked ones, then the newest tokens."""
        n = seq.num_cached_slots
        known = state.positions[layer]
        if known is None:
            known = torch.empty(self.num_kv_heads, 0, dtype=torch.long, device=self.device)
        start = seq.num_computed_tokens - (n - known.shape[1])
        fresh = torch.arange(start, seq.num_computed_tokens, device=self.device).expand(self.num_kv_heads, -1)
        return torch.cat((known, fresh), dim=1)

    def _visible(self, state: _SeqState, layer: int, num_slots: int) -> torch.Tensor | None:
        """The slots a layer's attention sees (None: all of them): its kept ones and the newer ones."""
        lengths = state.lengths
        if lengths is None or lengths.kept[layer] >= lengths.shared:
            return None
        return torch.cat((torch.arange(lengths.kept[layer], device=self.device),
                          torch.arange(lengths.shared, num_slots, device=self.device)))

    def select(self, seq: Sequence, state: _SeqState, sizes: list[int], windows: list[int],
               pinned: int = 0) -> list[torch.Tensor]:
        """Per layer, the slot indices each KV head keeps, [kv_heads, max(sizes)]: the layer's `sizes[l]`
        chosen slots, sorted, then (when layers differ) sorted filler slots its attention will not see."""
        n, budget = seq.num_cached_slots, max(sizes)
        slots = self._slot_ids(seq)
        keep = []
        for layer, store in enumerate(self.kv_cache.stores):
            stat = state.stats[layer]
            if stat is not None and stat.shape[-1] > n:  # speculative tokens observed, then rolled back
                stat = stat[..., :n]
            if state.policy.needs_attention and (stat is None or stat.shape[-1] != n):
                raise RuntimeError(f"{state.policy.name}: no attention statistics for layer {layer}; "
                                   "the attention backend must call SequenceSlice.observer")
            size = sizes[layer]
            window = min(windows[layer], size - pinned)
            visible = self._visible(state, layer, n)
            # A layer that dropped slots before is scored on the slots it still sees, in order, so its
            # window and any pooling over neighbours count only those.
            seen = slots if visible is None else slots[visible]
            k, v = store.gather(seen)
            positions = self._positions(seq, state, layer)
            if visible is not None:
                positions = positions[:, visible]
                stat = None if stat is None else stat[..., visible]
            inputs = ScoreInputs(layer, self.num_layers, k.transpose(0, 1), v.transpose(0, 1), stat, positions)
            chosen = keep_indices(state.policy.score(inputs), size, window, pinned)
            if visible is not None:
                chosen = visible[chosen]
            if size < budget:
                rest = torch.ones(self.num_kv_heads, n, dtype=torch.bool, device=self.device)
                rest.scatter_(1, chosen, False)
                filler = rest.nonzero()[:, 1].view(self.num_kv_heads, -1)[:, :budget - size]
                chosen = torch.cat((chosen, filler), dim=1)
            keep.append(chosen)
        return keep

    def _first_changed(self, seq: Sequence, old_table: list[int], keep: list[torch.Tensor], pinned: int) -> int:
        """Offset (from `pinned`, rounded down to a block) of the first kept slot that does not stay in place."""
        bs, budget = self.blocks.block_size, keep[0].shape[1]
        first = budget
        in_place = torch.arange(budget, device=self.device)
        for idx in keep:
            moved = (idx != in_place).any(dim=0).nonzero()
            if len(moved):
                first = min(first, int(moved[0]))
        for i in range(pinned // bs, len(seq.block_table)):
            if seq.block_table[i] != old_table[i]:
                first = min(first, i * bs)
                break
        return max(0, (first // bs) * bs - pinned)

    def _sizes(self, seq: Sequence, state: _SeqState) -> tuple[list[int], list[int]]:
        """Per layer, the slots to keep now and the policy's window."""
        n = seq.num_cached_slots
        if state.layer_budgets is None:
            state.layer_budgets = (state.policy.layer_budgets(state.budget, n, state.stats)
                                   or [state.budget] * self.num_layers)
        windows = [state.policy.window(b) for b in state.layer_budgets]
        sizes = []
        for layer, target in enumerate(state.layer_budgets):
            visible = self._visible(state, layer, n)
            sizes.append(min(target, n if visible is None else len(visible)))
        return sizes, windows

    def compress(self, seq: Sequence, state: _SeqState) -> None:
        """Evict down to the budget, moving each head's kept slots to the front; frees the tail blocks.

        A prefix shared with other sequences is copied on write; when no blocks are free for the
        copies, it is kept in place instead (pinned) and the budget is exceeded by that much.
        """
        n, bs = seq.num_cached_slots, self.blocks.block_size
        sizes, windows = self._sizes(seq, state)
        budget = max(sizes)
        pinned_blocks = 0
        if not self.blocks.can_compact(seq, budget):
            pinned_blocks = self.blocks.shared_prefix_blocks(seq)
            sizes = [min(n, max(size, pinned_blocks * bs + max(1, window))) for size, window in zip(sizes, windows)]
            budget = max(sizes)
            if budget >= n:
                state.target = n
                return
            self.stats.pinned += 1
        pinned = pinned_blocks * bs
        keep = self.select(seq, state, sizes, windows, pinned)
        slots = self._slot_ids(seq)
        heads = torch.arange(self.num_kv_heads, device=self.device)[:, None]
        merges, demotes = state.policy.merges, state.policy.demotes
        kept, demoted_k, demoted_v = [], [], []
        for layer, (store, idx) in enumerate(zip(self.kv_cache.stores, keep)):
            if isinstance(store, DenseKV) and not (merges or demotes):
                src = slots[idx[:, pinned:]]
                kept.append((store.k[src, heads], store.v[src, heads]))
                continue
            # quantized, merging or demoting: the sequence's slots in float once, each head's picked from them
            k, v = store.gather(slots)
            k_kept, v_kept = k[idx[:, pinned:], heads], v[idx[:, pinned:], heads]
            if merges:
                self._merge(state, layer, k, v, idx, sizes[layer], pinned, k_kept, v_kept)
            if demotes:
                evicted = self._evicted(state, layer, n, idx, sizes[layer])
                demoted_k.append(k[evicted, heads])
                demoted_v.append(v[evicted, heads])
            kept.append((k_kept, v_kept))
        if demotes:
            self._demote(seq, state, demoted_k, demoted_v)
        positions = [self._positions(seq, state, layer) for layer in range(self.num_layers)]
        table = list(seq.block_table)
        if not self.blocks.compact(seq, budget, keep_blocks=pinned_blocks):
            raise RuntimeError("KV compaction found no blocks although can_compact said it would")
        dst = self._slot_ids(seq)[None, pinned:]
        # A quantized cache rewrites only from the first block whose content changes (a moved slot in
        # any layer and head, a merged slot, or a fresh copy-on-write block), so kept blocks are not
        # quantized again.
        start = 0 if isinstance(self.kv_cache.stores[0], DenseKV) or merges else self._first_changed(
            seq, table, keep, pinned)
        dst_q = dst[0, start:]  # one tensor for every layer: the quantized stores plan a write once
        for layer, (store, (k, v), idx) in enumerate(zip(self.kv_cache.stores, kept, keep)):
            if isinstance(store, DenseKV):
                store.k[dst, heads] = k
                store.v[dst, heads] = v
            elif len(dst_q):
                store.write(dst_q, k[:, start:].transpose(0, 1), v[:, start:].transpose(0, 1))
            state.positions[layer] = positions[layer].gather(1, idx)
            stat = state.stats[layer]
            if stat is not None:
                shape = (self.num_kv_heads,) + (1,) * (stat.dim() - 2) + (budget,)
                state.stats[layer] = stat.gather(-1, idx.to(stat.device).view(shape).expand(*stat.shape[:-1], budget))
        state.target = budget
        state.lengths = LayerLengths(tuple(sizes), budget) if min(sizes) < budget else None
        if demotes:
            self._charge(seq, state)  # after compact: the blocks it freed can hold the side store
        self.stats.compactions += 1
        self.stats.evicted_slots += n - budget

    def _evicted(self, state: _SeqState, layer: int, n: int, keep: torch.Tensor, size: int) -> torch.Tensor:
        """The slots a layer evicts now, per head, sorted: [kv_heads, E]. Filler slots (kept for other
        layers) and slots the layer no longer sees are not evicted now."""
        evicted = torch.zeros(self.num_kv_heads, n, dtype=torch.bool, device=self.device)
        visible = self._visible(state, layer, n)
        evicted[:, slice(None) if visible is None else visible] = True
        evicted.scatter_(1, keep[:, :size], False)
        return evicted.nonzero()[:, 1].view(self.num_kv_heads, -1)

    def _demote(self, seq: Sequence, state: _SeqState, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Quantize the evicted tokens ([kv_heads, E, head_dim] per layer) into the sequence's side store."""
        policy = state.policy
        if state.demoted is None:
            state.demoted = LowPrecisionTokens(self.num_layers, policy.bits, policy.group_size)
            self._demoting.add(seq)
        state.demoted.append(keys, values)
        self.stats.demoted_slots += keys[0].shape[1]

    def _charge(self, seq: Sequence, state: _SeqState) -> None:
        """Hold ceil(side-store bytes / one pool block's bytes) blocks for the sequence outside its block table.

        When the pool cannot give them, the oldest demoted tokens are dropped (evicted for good, as the
        importance rule alone would have) until the store fits: demotion never exceeds the pool and never
        preempts (a recomputed sequence would demote the same tokens again). The blocks the sequence needs
        before its next compaction are left free, so a sequence alone in the pool always finishes; other
        sequences short of blocks preempt as usual, and a preempted sequence's side store goes with it.
        """
        store, block_nbytes = state.demoted, self.kv_cache.block_nbytes
        headroom = max(0, self.blocks.blocks_for(state.target + self.blocks.block_size) - len(seq.block_table))
        room = self.blocks.num_side_blocks_of(seq) + max(0, self.blocks.num_free_blocks - headroom)
        self.stats.demoted_dropped += store.drop_oldest(room * block_nbytes)
        if store.num_tokens == 0:
            state.demoted = None
            self._demoting.discard(seq)
        if not self.blocks.hold_side_blocks(seq, -(-store.nbytes // block_nbytes)):
            raise RuntimeError("the side store found no blocks although it was cut to the free ones")

    def _merge(self, state: _SeqState, layer: int, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
               size: int, pinned: int, k_kept: torch.Tensor, v_kept: torch.Tensor) -> None:
        """Let the policy fold this layer's evicted slots into its kept ones (in k_kept, v_kept).

        The pinned slots stay as they are (they are shared with other sequences); filler slots
        neither give nor take.
        """
        evicted_idx = self._evicted(state, layer, k.shape[0], keep, size)
        if evicted_idx.shape[1] == 0 or size == pinned:
            return
        merged_k, merged_v = state.policy.merge(layer, k.transpose(0, 1), v.transpose(0, 1), keep[:, pinned:size],
                                                evicted_idx)
        k_kept[:, :size - pinned] = merged_k
        v_kept[:, :size - pinned] = merged_v
