"""Plain decoding steps: the tensor-only DecodeMetadata path and its compiled form give what the
general per-sequence path gives."""

import os
from pathlib import Path

import pytest
import torch

from thrifty.engine import compiled_decode
from thrifty.engine.sampling_params import SamplingParams
from thrifty.models import blocked_linear, skinny_linear
from thrifty.models.decode_attention import DecodeMetadata, decode_attention
from thrifty.models.paged_attention import AttentionMetadata, SequenceSlice, paged_attention
from tests.fixtures.tiny_models import make_tiny_llm

H, KVH, D, BLOCK, BLOCKS = 4, 2, 8, 4, 32
PROMPTS = ["the cat sat on the mat", "a", "one two three four five six seven eight nine ten eleven twelve"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def test_decode_metadata_lists_each_sequences_slots_and_its_new_slot():
    meta = DecodeMetadata.build([[5, 2], [7], [1, 3, 0]], [6, 3, 9], BLOCK, torch.device("cpu"))
    assert meta.slot_mapping.tolist() == [9, 30, 0]
    assert meta.slot_ids[0, :6].tolist() == [20, 21, 22, 23, 8, 9]
    assert meta.slot_ids[1, :3].tolist() == [28, 29, 30]
    assert meta.slot_ids[2].tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 0]
    assert meta.allowed[:, 0].sum(dim=1).tolist() == [6, 3, 9] and meta.query_slots[:, 0].tolist() == [5, 2, 8]
    assert DecodeMetadata.build([[5, 2]], [6], BLOCK, torch.device("cpu")).allowed is None


def _per_sequence(q, k, v, k_cache, v_cache, meta: DecodeMetadata, context_lens: list[int],
                  window: int | None = None) -> torch.Tensor:
    """Each sequence's rows attended alone, as the general path runs them (writing their K/V too)."""
    query_len = q.shape[0] // len(context_lens)
    expected = torch.empty_like(q)
    for i, n in enumerate(context_lens):
        slots, own = meta.slot_ids[i, :n], slice(i * query_len, (i + 1) * query_len)
        alone = AttentionMetadata(slot_mapping=slots[-query_len:], sequences=[SequenceSlice(0, query_len, n, slots)])
        expected[own] = paged_attention(q[own], k[own], v[own], k_cache, v_cache, alone, scale=0.3, layer=0,
                                        sliding_window=window)
    return expected


@pytest.mark.parametrize("query_len", [1, 3])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("context_lens", [[13], [9, 30, 4, 17]])
def test_decode_attention_equals_the_per_sequence_path(window, context_lens, query_len):
    """Q new tokens per sequence (a verify step of chain drafts when Q > 1) attend causally, as the general path."""
    g = torch.Generator().manual_seed(len(context_lens) + query_len)
    blocks = torch.randperm(BLOCKS, generator=g).tolist()
    tables, used = [], 0
    for n in context_lens:
        count = -(-n // BLOCK)
        tables.append(blocks[used:used + count])
        used += count
    meta = DecodeMetadata.build(tables, context_lens, BLOCK, torch.device("cpu"), query_len)
    rows = len(context_lens) * query_len
    q, k, v = (torch.randn(rows, h, D, generator=g) for h in (H, KVH, KVH))
    k_cache, v_cache = torch.randn(BLOCKS * BLOCK, KVH, D, generator=g), torch.randn(BLOCKS * BLOCK, KVH, D, generator=g)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = _per_sequence(q, k, v, expected_k, expected_v, meta, context_lens, window)
    out = decode_attention(q, k, v, k_cache, v_cache, meta, scale=0.3, sliding_window=window)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("query_len", [1, 3])
def test_decode_attention_over_a_quantized_store_equals_the_per_sequence_path(query_len):
    """With an int8 KV store each new token attends to itself as computed (not as stored), as the general path."""
    from thrifty.kv.quant import Int8KV

    g = torch.Generator().manual_seed(query_len)
    context_lens, tables = [7, 12], [[3, 0], [5, 1, 6]]
    meta = DecodeMetadata.build(tables, context_lens, BLOCK, torch.device("cpu"), query_len)
    rows = len(context_lens) * query_len
    q, k, v = (torch.randn(rows, h, D, generator=g) for h in (H, KVH, KVH))
    store, reference = (Int8KV(BLOCKS * BLOCK, KVH, D, torch.float32, torch.device("cpu")) for _ in range(2))
    old_k, old_v = torch.randn(BLOCKS * BLOCK, KVH, D, generator=g), torch.randn(BLOCKS * BLOCK, KVH, D, generator=g)
    everywhere = torch.arange(BLOCKS * BLOCK)
    store.write(everywhere, old_k, old_v)
    reference.write(everywhere, old_k, old_v)
    expected = _per_sequence(q, k, v, reference, reference, meta, context_lens)
    out = decode_attention(q, k, v, store, store, meta, scale=0.3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_decode_metadata_for_several_new_tokens_masks_each_tokens_successors():
    meta = DecodeMetadata.build([[5, 2]], [6], BLOCK, torch.device("cpu"), query_len=3)
    assert meta.slot_mapping.tolist() == [23, 8, 9]  # the last three slots: the token and its two-token draft
    assert meta.query_slots[0].tolist() == [3, 4, 5] and meta.allowed[0].sum(dim=1).tolist() == [4, 5, 6]


def _generate(llm, batched: bool) -> list[list[int]]:
    if batched:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    return [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in PROMPTS]


@pytest.mark.parametrize("batched", [False, True])
def test_decode_path_gives_the_general_paths_tokens(model_path, batched):
    llm = make_tiny_llm(model_path)
    runner = llm.engine.runner
    steps = []
    original = runner._execute_decode
    runner._execute_decode = lambda batch, query_len: steps.append(len(batch)) or original(batch, query_len)
    fast = _generate(llm, batched)
    assert steps and (max(steps) > 1) == batched  # the path ran, for one sequence or for several
    runner._decode_path = False  # every step through AttentionMetadata, as before the decode path
    assert _generate(llm, batched) == fast


def test_verify_steps_of_chain_drafts_take_the_decode_path(model_path):
    """A verify step whose sequences all carry chain drafts of one length runs as Q-token decode rows
    and gives the general path's tokens (and plain decoding's)."""
    llm = make_tiny_llm(model_path, speculative_adaptive=False, num_speculative_tokens=3)
    runner = llm.engine.runner
    query_lens = []
    original = runner._execute_decode
    runner._execute_decode = lambda batch, query_len: query_lens.append(query_len) or original(batch, query_len)
    repetitive = ["one two three one two three one two three one two", "a b a b a b a b a b a b"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, speculative="ngram")
    fast = [o.outputs[0].token_ids for o in llm.generate(repetitive, params)]
    assert max(query_lens) > 1 and llm.engine.stats()["spec_ngram_accepted_tokens"] > 0
    runner._decode_path = False
    assert [o.outputs[0].token_ids for o in llm.generate(repetitive, params)] == fast
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(repetitive, plain)] == fast


@pytest.fixture(scope="module")
def aot_cache(tmp_path_factory):
    """One cache of compiled graphs for this module's engines: each graph set is built once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THRIFTY_CACHE_DIR", str(tmp_path_factory.mktemp("thrifty_cache")))
        yield


@pytest.mark.parametrize(("model_file", "weights"), [("tiny_llama_gguf", "fp32"), ("tiny_llama_gguf", "int4"),
                                                       ("tiny_gemma3_gguf", "int4")])
def test_compiled_decode_gives_the_eager_tokens(request, aot_cache, model_file, weights):
    """Llama and Gemma 3 layers (sliding-window attention, query/key norms, scaled embeddings)."""
    path = request.getfixturevalue(model_file)
    reference = make_tiny_llm(path, weights=weights)
    eager = [_generate(reference, batched=False), _generate(reference, batched=True)]
    llm = make_tiny_llm(path, weights=weights, compile=True)
    compiled = llm.engine.runner.decode_body
    assert compiled.error is None
    ran = []
    for kind, graph in compiled._graphs.items():  # count the calls each graph gets
        compiled._graphs[kind] = _Counting(graph, kind, ran)
    assert [_generate(llm, batched=False), _generate(llm, batched=True)] == eager
    assert "single" in ran and set(ran) & {"batch", compiled_decode.TILES_GRAPH}  # batch_tiles on AMX CPUs


class _Counting:
    def __init__(self, graph, kind: str, ran: list[str]) -> None:
        self.graph, self.kind, self.ran = graph, kind, ran

    def boxed_run(self, inputs):
        self.ran.append(self.kind)
        return self.graph.boxed_run(inputs)


@pytest.mark.parametrize("weights", ["int4", "fp32", "fp32-without-skinny-kernel"])
def test_compiled_verify_steps_give_plain_decodings_tokens(tiny_llama_gguf, aot_cache, monkeypatch, request, weights):
    """A verify step of one sequence's chain draft runs through the `verify` graph; in float32 its
    matmuls go through thrifty's few-row kernel, or where that cannot run the weights' oneDNN-blocked
    copies."""
    if weights == "fp32-without-skinny-kernel":
        request.getfixturevalue("without_skinny_kernel")
        weights = "fp32"
    llm = make_tiny_llm(tiny_llama_gguf, weights=weights, compile=True, speculative_adaptive=False,
                        num_speculative_tokens=3)
    compiled = llm.engine.runner.decode_body
    ran = []
    compiled._graphs["verify"] = _Counting(compiled._graphs["verify"], "verify", ran)
    found = _CountingLookups(blocked_linear._BLOCKED)
    monkeypatch.setattr(blocked_linear, "_BLOCKED", found)
    repetitive = "one two three one two three one two three one two"
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, speculative="ngram")
    fast = llm.generate([repetitive], params)[0].outputs[0].token_ids
    assert ran and llm.engine.stats()["spec_ngram_accepted_tokens"] > 0
    assert (found.hits > 0) == (weights == "fp32" and not skinny_linear.available())
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert llm.generate([repetitive], plain)[0].outputs[0].token_ids == fast


class _CountingLookups(dict):
    def __init__(self, entries) -> None:
        super().__init__(entries)
        self.hits = 0

    def get(self, key, default=None):
        value = super().get(key, default)
        self.hits += value is not None
        return value


@pytest.mark.parametrize("kind", ["single", "batch", "verify", compiled_decode.TILES_GRAPH])
def test_only_the_tiles_graph_multiplies_int4_through_the_tile_layout(tiny_llama_gguf, kind):
    """On an AMX CPU the batch_tiles graph calls thrifty::int4_tiles_mm (lowered to inductor's AMX
    template at build time); the others keep PyTorch's int4 op, whose rows do not depend on the batch."""
    from thrifty.quant.int4_tiles import amx_available, traced_with_tiles

    model = make_tiny_llm(tiny_llama_gguf, weights="int4").engine.model
    slots = compiled_decode.tensor_slots(model)
    args, dynamic = compiled_decode._example(model, torch.float32, slots, kind)
    with torch.no_grad(), traced_with_tiles(kind == compiled_decode.TILES_GRAPH):
        program = torch.export.export(compiled_decode._Body(model, slots), args, dynamic_shapes=dynamic, strict=False)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    tiled = kind == compiled_decode.TILES_GRAPH and amx_available()
    assert ("thrifty.int4_tiles_mm.default" in targets) == tiled
    assert ("aten._weight_int4pack_mm_for_cpu.default" in targets) == (not tiled)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("kind", ["single", "batch", "verify"])
def test_float32_graphs_call_the_skinny_kernel_or_else_the_blocked_matmuls(tiny_llama_gguf, request, kind, kernel):
    """The kernel is a C++ op, so a compiled float32 step calls no Python for its matmuls."""
    if kernel and not skinny_linear.available():
        pytest.skip("the kernel needs an AVX-512 CPU and a C++ compiler")
    if not kernel:
        request.getfixturevalue("without_skinny_kernel")
    model = make_tiny_llm(tiny_llama_gguf, weights="fp32").engine.model
    slots = compiled_decode.tensor_slots(model)
    args, dynamic = compiled_decode._example(model, torch.float32, slots, kind)
    with torch.no_grad():
        program = torch.export.export(compiled_decode._Body(model, slots), args, dynamic_shapes=dynamic, strict=False)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert ("thrifty.skinny_linear.default" in targets) == kernel
    # With symbolic rows (batch and verify) the blocked matmuls are picked at run time by the op.
    assert ("thrifty.blocked_linear.default" in targets) == (not kernel and kind != "single")


def test_batches_that_speculate_keep_off_the_tiles_graph(tiny_llama_gguf, aot_cache):
    """Plain batch steps of speculating sequences must round as their verify steps (eager) do."""
    from thrifty.quant.int4_tiles import amx_available

    if not amx_available():
        pytest.skip("the tiles graph is built on CPUs with AMX only")
    llm = make_tiny_llm(tiny_llama_gguf, weights="int4", compile=True, speculative_adaptive=False,
                        num_speculative_tokens=3)
    compiled = llm.engine.runner.decode_body
    assert compiled.error is None and compiled_decode.TILES_GRAPH in compiled._graphs
    ran = []
    for kind, graph in compiled._graphs.items():
        compiled._graphs[kind] = _Counting(graph, kind, ran)
    llm.generate(PROMPTS, GREEDY)
    assert compiled_decode.TILES_GRAPH in ran and "batch" not in ran
    ran.clear()
    speculating = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, speculative="ngram")
    llm.generate(PROMPTS, speculating)
    assert "batch" in ran and compiled_decode.TILES_GRAPH not in ran


def test_the_builders_check_refuses_a_graph_that_parts_from_eager(tiny_llama_gguf):
    """The check compares the keys and values a graph writes in the first layers with eager's."""
    model = make_tiny_llm(tiny_llama_gguf, weights="int4").engine.model
    slots = compiled_decode.tensor_slots(model)
    body = compiled_decode._Body(model, slots)

    def eager(inputs, noise=0.0):  # the body, on activations off by `noise` (relative) if asked
        x, positions, slot_mapping, slot_ids, query_slots, allowed, *tensors = inputs
        x = x + noise * x.std() * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return body(x, positions, slot_mapping, slot_ids, query_slots, allowed, tuple(tensors))

    compiled_decode.check_against_eager(model, torch.float32, slots, "batch", eager)
    compiled_decode.check_against_eager(model, torch.float32, slots, "batch", lambda inputs: eager(inputs, 1e-3))
    with pytest.raises(RuntimeError, match="parts from the eager one: the k it writes at layer 0"):
        compiled_decode.check_against_eager(model, torch.float32, slots, "batch", lambda inputs: eager(inputs, 1.0))


def test_a_second_engine_loads_the_compiled_graphs_from_the_cache(tiny_llama_gguf, aot_cache):
    make_tiny_llm(tiny_llama_gguf, weights="int4", compile=True)
    again = make_tiny_llm(tiny_llama_gguf, weights="int4", compile=True).engine.runner.decode_body
    assert again.error is None and again.built == 0 and set(again._graphs) == set(again.kinds)


def test_graph_kinds_cover_the_decode_steps_they_can_take():
    kind = compiled_decode._graph_kind
    assert [kind(1, 1), kind(2, 1), kind(16, 1), kind(1, 2), kind(1, 17)] == ["single", "batch", "batch",
                                                                           "verify", "verify"]
    assert kind(17, 1) is None and kind(1, 18) is None and kind(2, 2) is None  # these run eagerly


def test_packages_unused_for_a_month_and_dead_builds_partial_files_are_pruned(tmp_path):
    now = 1_000_000_000.0
    ages = {"used-yesterday.pt2": 86400, "unused.pt2": (compiled_decode.UNUSED_DAYS + 1) * 86400,
            "key.123.partial.pt2": (compiled_decode.PARTIAL_HOURS + 1) * 3600, "key.456.partial.pt2": 60, "notes.txt": 10**8}
    for name, age in ages.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (now - age, now - age))
    compiled_decode._prune_cache(tmp_path, now)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.456.partial.pt2", "notes.txt", "used-yesterday.pt2"]


def test_loading_a_cached_package_marks_it_used(tiny_llama_gguf, aot_cache):
    make_tiny_llm(tiny_llama_gguf, weights="int4", compile=True)  # built here or by an earlier test
    packages = list((Path(os.environ["THRIFTY_CACHE_DIR"]) / "aot").glob("*.pt2"))
    for path in packages:
        os.utime(path, (0, 0))
    llm = make_tiny_llm(tiny_llama_gguf, weights="int4", compile=True)
    assert llm.engine.runner.decode_body.built == 0
    assert sum(1 for path in packages if path.stat().st_mtime > 0) == len(llm.engine.runner.decode_body.kinds)


def test_a_failing_compiler_falls_back_to_eager(tiny_llama_gguf, monkeypatch, tmp_path):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    eager = _generate(make_tiny_llm(tiny_llama_gguf), batched=False)
    monkeypatch.setenv("THRIFTY_CACHE_DIR", str(tmp_path))  # an empty cache: the build must run
    monkeypatch.setattr(compiled_decode, "_build_in_child", broken)
    llm = make_tiny_llm(tiny_llama_gguf, compile=True)
    assert "no C++ compiler" in llm.engine.runner.decode_body.error
    assert _generate(llm, batched=False) == eager


def test_compile_with_a_quantized_kv_cache_is_refused(tiny_llama_gguf):
    from thrifty.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="compile"):
        make_tiny_llm(tiny_llama_gguf, compile=True, kv_cache_dtype="int8")


def test_compile_also_compiles_the_model_drafters(tiny_llama_gguf, aot_cache):
    """A drafter's passes are plain decoding steps of a small model, so --compile covers them too."""
    from thrifty.engine.compiled_decode import CompiledDecode

    eager = _generate(make_tiny_llm(tiny_llama_gguf), batched=True)
    llm = make_tiny_llm(tiny_llama_gguf, compile=True, speculative_adaptive=False, num_speculative_tokens=3)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, speculative="layerskip")
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == eager
    drafter = llm.engine.speculator.proposers["layerskip"]
    assert isinstance(drafter.runner.decode_body, CompiledDecode) and drafter.runner.decode_body.error is None
    assert llm.engine.stats()["spec_layerskip_draft_tokens"] > 0


def test_only_long_prefill_steps_give_free_memory_back(model_path, monkeypatch):
    """Trimming the heap pays after prefill chunks, not after decode steps, whatever their batch."""
    from thrifty.engine import model_runner

    released = []
    monkeypatch.setattr(model_runner, "release_free_memory", lambda: released.append(True))
    llm = make_tiny_llm(model_path)
    steps = []
    original = llm.engine.runner.execute
    llm.engine.runner.execute = lambda batch: steps.append(sum(item.num_tokens for item in batch)) or original(batch)
    long_prompt = list(range(3, 3 + model_runner._RELEASE_AFTER_TOKENS))
    llm.generate([long_prompt], GREEDY)
    assert steps[0] >= model_runner._RELEASE_AFTER_TOKENS and len(steps) == GREEDY.max_tokens
    assert len(released) == 1  # the prefill chunk, none of the nine decode steps
    llm.generate(PROMPTS, GREEDY)
    assert len(released) == 1
    # Short prompts whose prefill adds up past the threshold in one step count too; their decode steps do not.
    steps.clear()
    llm.generate([[3 + i] + list(range(100, 119)) for i in range(16)], GREEDY)  # distinct: no prefix hits
    assert steps[0] >= model_runner._RELEASE_AFTER_TOKENS and len(released) == 2



def test_a_batched_verify_step_counts_no_prompt_tokens():
    """Sixteen sequences verifying 16 draft tokens each make 272 rows, but no prefill: no trim."""
    from types import SimpleNamespace

    from thrifty.engine.model_runner import _RELEASE_AFTER_TOKENS, prompt_tokens

    verify = [SimpleNamespace(num_tokens=1, num_query_tokens=17) for _ in range(16)]
    assert sum(item.num_query_tokens for item in verify) >= _RELEASE_AFTER_TOKENS
    assert prompt_tokens(verify) == 0
    mixed = [*verify, SimpleNamespace(num_tokens=300, num_query_tokens=300)]  # a prefill chunk joins the step
    assert prompt_tokens(mixed) == 300
