"""Side-store bytes per demoted token on SmolLM2-135M: a 1024-token essay prompt, mikv at 1/8, 48 decode steps,
and the pool blocks the side store is charged."""
import torch

from thrifty.api import LLM
from thrifty.bench.kv_perplexity import essay_ids
from thrifty.engine.sampling_params import SamplingParams

torch.set_num_threads(2)
llm = LLM("smollm2-135m", kv_cache_tokens=4096, enable_prefix_caching=False)
engine = llm.engine
ids = essay_ids(llm.tokenizer, 1024)
full = engine.kv_cache.bytes_per_token
for bits in (2, 4):
    engine.add_request(f"b{bits}", ids, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, kv_policy="mikv",
                                                       kv_budget=128, kv_policy_options={"bits": bits}))
    seq = engine.requests[f"b{bits}"].seqs[0]
    rows = []
    while engine.has_unfinished_requests():
        engine.step()
        state = engine.kv_compressor._states.get(seq)
        if state is not None and state.demoted is not None and not seq.is_finished:
            rows.append((seq.num_computed_tokens, seq.num_cached_slots, state.demoted.num_tokens,
                         engine.kv_compressor.demoted_nbytes, engine.block_manager.num_side_blocks_of(seq)))
    for when, (computed, kept, held, nbytes, side) in (("after prefill", rows[0]), ("after 47 decode steps", rows[-1])):
        print(f"bits={bits} {when}: {computed} tokens = {kept} full-precision slots + {held} demoted; side store "
              f"{nbytes} B = {nbytes / held:.0f} B/demoted token (full precision: {full:.0f} B/token, "
              f"{full / (nbytes / held):.1f}x); sequence total {(kept * full + nbytes) / computed:.0f} B/token; "
              f"side store charged {side} pool blocks of {engine.kv_cache.block_nbytes} B")
