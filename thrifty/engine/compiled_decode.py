"""Decode steps compiled ahead of time with AOTInductor: the whole model body as one C++ call.

A batch-1 decode step of a small model is about a thousand small eager ops (norms, casts, RoPE,
cache gathers), each paying Python and dispatcher overhead. torch.export traces the body once,
AOTInductor fuses the elementwise ops into a few C++ loops, calls the matmul and attention kernels
(the packed int4 ones included) as extern kernels, and compiles the result into a shared library
whose one entry point runs every layer: no Python, no Dynamo guards between ops. On SmolLM2-135M
in int4 the body took 4.9 ms a step against 11.1 eager, and 6.4 against 13.2 at 300 tokens of
context (2-core AVX-512). The regional torch.compile this replaces, one compiled layer function
called 30 times with Dynamo's guards each time, made a whole step (head included) about 10 ms.

Every tensor the body reads (weights, packed weights, KV caches) is an input of the compiled
graph, not a constant baked into it, so the library holds no weights (a few MB), the serving
process keeps one copy of them, and one build serves every model file of the same architecture,
formats and shapes. Builds run in a child process (`python -m thrifty.engine.compiled_decode
REQUEST`), so neither the compiler's memory (about 300 MB) nor inductor's import stays in the server,
and land in a cache directory ($THRIFTY_CACHE_DIR/aot, default ~/.cache/thrifty/aot) keyed by
everything the graph depends on: the first start builds (about a minute per graph for SmolLM2),
later ones load in well under a second. Each load marks its package as used, and each build
removes the packages no start has used for UNUSED_DAYS (older code, models no longer served) and
partial files that crashed builds left behind.

There are three graphs (GRAPHS below), with the context length and the cache size dynamic: one
sequence with one new token, a batch of them, and one sequence with a few new tokens (a verify
step, a drafter's short read). Other steps run eagerly, as does everything after a failure to build,
load or run. A float32 model's graphs call thrifty's few-row kernel (thrifty.models.skinny_linear), a
C++ op; where that cannot run, the batch and verify graphs call the oneDNN-blocked weight copies
(thrifty.models.blocked_linear), which win from a few rows on. Int4 matmuls are lowered
to inductor's C++ GEMM templates where those win (thrifty.engine.gemm_templates): on CPUs with AMX,
graphs of several rows read the int4 codes in the AMX kernel's tile layout (thrifty.quant.int4_tiles).
Every new graph is checked against the eager body before it is kept (`check_against_eager`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from thrifty.cache_dir import cache_dir
from thrifty.cpu_info import cpuinfo_field
from thrifty.models import skinny_linear
from thrifty.models.base import CausalLM
from thrifty.models.decode_attention import DecodeMetadata
from thrifty.models.layers import Linear
from thrifty.quant.int4_tiles import amx_available, traced_with_tiles
from thrifty.quant.packed import Int4Weight

log = logging.getLogger(__name__)

# The graphs: one sequence and one new token; 2..MAX_BATCH sequences with one new token each; one
# sequence with 2..MAX_QUERY new tokens (a verify step of a chain draft, a drafter's short read).
# Sizes 1 and more are separate graphs because export specializes strides on them.
GRAPHS = ("single", "batch", "verify")
# On CPUs with AMX, a model with int4 weights also gets a batch graph whose int4 matmuls run inductor's
# AMX template (thrifty.quant.int4_tiles), for batches of sequences that do not speculate.
TILES_GRAPH = "batch_tiles"
MAX_BATCH = 16
# a chain draft of up to 16 tokens (prompt lookup's default) plus the sequence's last token: above 8
# rows a float32 verify step took 55 against 72 ms eagerly (17 rows, SmolLM2-135M, Sapphire Rapids)
MAX_QUERY = 17
# code the graphs are traced from
_SOURCES = ("models", "models/skinny_linear.cpp", "quant", "kv/quant", "cpu_info.py", "engine/compiled_decode.py", "engine/gemm_templates.py")
# The builder's check of a new graph against eager: rounding (bfloat16 activations of the packed
# kernels, another summation order) stays near 1e-2 in the first layers; a wrong kernel is near 1.
CHECK_TOLERANCE = 0.05
CHECKED_LAYERS = 2


# -- what the graph reads ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where the body reads one tensor from: an attribute of a module or of a packed weight."""

    owner: object
    attr: str
    name: str  # for the cache key

    def get(self) -> torch.Tensor:
        return getattr(self.owner, self.attr)

    def set(self, tensor: torch.Tensor) -> None:
        if isinstance(self.owner, nn.Module) and self.attr in self.owner._parameters:
            self.owner._parameters[self.attr] = tensor  # a plain tensor where a Parameter was, while tracing
        else:
            object.__setattr__(self.owner, self.attr, tensor)


def tensor_slots(model: CausalLM) -> list[TensorSlot]:
    """Every tensor `model.body` reads, in a fixed order: weights (packed or dense) and KV caches."""
    slots = []
    for path, module in model.model.named_modules():
        if module is model.model.embed_tokens:
            continue  # the body starts from embeddings
        for attr, param in module.named_parameters(recurse=False):
            if param.numel():  # a packed Linear's float weight is an empty placeholder
                slots.append(TensorSlot(module, attr, f"{path}.{attr}"))
        if isinstance(module, Linear) and module.packed is not None:
            slots += [TensorSlot(module.packed, attr, f"{path}.packed.{attr}")
                      for attr, value in vars(module.packed).items() if isinstance(value, torch.Tensor)]
        if hasattr(module, "k_cache") and hasattr(module, "v_cache"):
            slots += [TensorSlot(module, "k_cache", f"{path}.k_cache"), TensorSlot(module, "v_cache", f"{path}.v_cache")]
    return slots


@contextlib.contextmanager
def _reading(slots: list[TensorSlot], tensors: tuple[torch.Tensor, ...]) -> Iterator[None]:
    """The body reads `tensors` in place of what `slots` hold, for the duration (export traces it)."""
    saved = [slot.get() for slot in slots]
    for slot, tensor in zip(slots, tensors):
        slot.set(tensor)
    try:
        yield
    finally:
        for slot, tensor in zip(slots, saved):
            slot.set(tensor)


class _Body(nn.Module):
    """model.body over flat inputs: step tensors as [B, Q, ...], then every slot's tensor."""

    def __init__(self, model: CausalLM, slots: list[TensorSlot]) -> None:
        super().__init__()
        self.model = model
        self.slots = slots

    def forward(self, x: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor, slot_ids: torch.Tensor,
                query_slots: torch.Tensor, allowed: torch.Tensor | None, tensors: tuple[torch.Tensor, ...]
                ) -> torch.Tensor:
        meta = DecodeMetadata(slot_mapping.flatten(), slot_ids, query_slots, allowed)
        with _reading(self.slots, tensors):
            return self.model.body(x.flatten(0, 1), positions.flatten(), meta)


# -- building ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelRecipe:
    """How to rebuild a model the way the engine loaded it (the build runs in a child process)."""

    model_path: str
    dtype: str  # a torch dtype name, "float32"
    weights: str  # the resolved run format
    kept_layers: list[int] | None = None  # a layer-skip view of the model

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


UNUSED_DAYS = 30  # a package no start has loaded for this long is removed at the next build
PARTIAL_HOURS = 6  # a build's partial file this old belongs to a build that died


def _prune_cache(directory: Path, now: float) -> None:
    """Remove packages unused for UNUSED_DAYS and partial files of dead builds (by modification time,
    which each load refreshes). A loaded package is unpacked at load, so removing it harms no one."""
    for path in directory.glob("*.pt2"):
        limit = PARTIAL_HOURS * 3600 if path.name.endswith(".partial.pt2") else UNUSED_DAYS * 86400
        with contextlib.suppress(OSError):  # another start may have removed or replaced it just now
            if now - path.stat().st_mtime > limit:
                path.unlink()


def _cache_dir() -> Path:
    return cache_dir("aot")


@functools.cache
def _source_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in _SOURCES:
        path = root / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.read_bytes())
    return digest.hexdigest()


def cache_key(model: CausalLM, slots: list[TensorSlot], kind: str) -> str:
    """Everything the compiled graph depends on: code, torch, CPU, model config, every input's layout."""
    layout = [(s.name, str(s.get().dtype), list(s.get().shape[1:] if s.attr.endswith("_cache") else s.get().shape))
              for s in slots]
    # The CPU's vendor picks float32 kernels and AMX the int4 ones; a graph with AMX code must not
    # load where there is none (a home directory shared between machines). A graph that calls the
    # few-row kernel must not load where it is off or cannot be built.
    cpu = [torch.backends.cpu.get_cpu_capability(), cpuinfo_field("vendor_id"), amx_available(),
           skinny_linear.available()]
    blob = json.dumps([_source_digest(), torch.__version__, cpu,
                       dataclasses.asdict(model.config),
                       layout, kind, MAX_BATCH, MAX_QUERY], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _example(model: CausalLM, dtype: torch.dtype, slots: list[TensorSlot], kind: str) -> tuple[tuple, tuple]:
    """Example inputs for export and their dynamic dimensions: context length and cache size always,
    the batch size or the new tokens per sequence in the graphs that take several."""
    block_size = 16
    batch, query = {"single": (1, 1), "batch": (2, 1), TILES_GRAPH: (2, 1), "verify": (1, 2)}[kind]
    meta = DecodeMetadata.build([[1, 2]] * batch, [20] * batch, block_size, torch.device("cpu"), query)
    x = torch.zeros(batch, query, model.config.hidden_size, dtype=dtype)
    positions = torch.arange(20 - query, 20).repeat(batch, 1)
    tensors = tuple(s.get() for s in slots)
    args = (x, positions, meta.slot_mapping.view(batch, query), meta.slot_ids, meta.query_slots, meta.allowed,
            tensors)
    ctx, pool = torch.export.Dim("context", min=2), torch.export.Dim("pool", min=block_size)
    caches = tuple({0: pool} if s.attr.endswith("_cache") else None for s in slots)
    if kind == "single":
        return args, (None, None, None, {1: ctx}, None, None, caches)
    if kind in ("batch", TILES_GRAPH):
        b = torch.export.Dim("batch", min=2, max=MAX_BATCH)
        return args, ({0: b}, {0: b}, {0: b}, {0: b, 1: ctx}, {0: b}, {0: b, 2: ctx}, caches)
    q = torch.export.Dim("query", min=2, max=MAX_QUERY)
    return args, ({1: q}, {1: q}, {1: q}, {1: ctx}, {1: q}, {1: q, 2: ctx}, caches)


def build(model: CausalLM, dtype: torch.dtype, kind: str, out: str) -> None:
    """Export the body, compile it into an AOTInductor package at `out` (in this process) and check
    the package's output against the eager body's."""
    import torch._inductor  # the compiler, imported only where a build runs

    from thrifty.engine.gemm_templates import int4_gemm_templates

    slots = tensor_slots(model)
    args, dynamic = _example(model, dtype, slots, kind)
    tiles = kind == TILES_GRAPH
    with torch.no_grad(), traced_with_tiles(tiles):
        program = torch.export.export(_Body(model, slots), args, dynamic_shapes=dynamic, strict=False)
    with int4_gemm_templates() if tiles else contextlib.nullcontext():
        torch._inductor.aoti_compile_and_package(program, package_path=out)
    graph = torch._C._aoti.AOTIModelPackageLoader(out, "model", True, 1, -1)
    check_against_eager(model, dtype, slots, kind, lambda inputs: graph.boxed_run(inputs)[0])


def check_against_eager(model: CausalLM, dtype: torch.dtype, slots: list[TensorSlot], kind: str,
                        run: Callable[[list[torch.Tensor]], torch.Tensor]) -> None:
    """Run a graph (`run`: flat inputs to the body's output) once after the eager body, on the
    embeddings of random tokens over random cache contents (the caches are overwritten), and raise
    if the keys and values they write in the first CHECKED_LAYERS layers part by more than rounding,
    as a matmul reading a weight in the wrong layout would. Those depend on every matmul of the first
    layer; the body's output would not do, as a 30-layer model turns rounding into 10-50% changes."""
    generator = torch.Generator().manual_seed(0)
    caches = [slot.get() for slot in slots if slot.attr.endswith("_cache")]
    for cache in caches:
        cache.normal_(0, 1, generator=generator)
    (x, positions, slot_mapping, slot_ids, query_slots, allowed, tensors), _ = _example(model, dtype, slots, kind)
    ids = torch.randint(0, model.config.vocab_size, x.shape[:2], generator=generator)
    x = model.embed(ids.flatten()).view(x.shape).to(dtype)
    meta = DecodeMetadata(slot_mapping.flatten(), slot_ids, query_slots, allowed)
    written = meta.slot_mapping
    with torch.no_grad():
        model.body(x.flatten(0, 1), positions.flatten(), meta)
    expected = [cache[written].clone() for cache in caches[:2 * CHECKED_LAYERS]]
    run([x, positions, slot_mapping, slot_ids, query_slots] + ([] if allowed is None else [allowed]) + list(tensors))
    for i, want in enumerate(expected):
        got = caches[i][written]
        error = ((got - want).norm() / want.norm()).item()
        if not error < CHECK_TOLERANCE:
            raise RuntimeError(f"the compiled {kind} step parts from the eager one: the {'kv'[i % 2]} it writes at "
                               f"layer {i // 2} is off by {error:.3g} (relative)")


def _build_in_child(recipe: ModelRecipe, kind: str, out: Path) -> None:
    request = json.dumps({"recipe": dataclasses.asdict(recipe), "kind": kind, "out": str(out)})
    result = subprocess.run([sys.executable, "-m", __name__, request], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"building the compiled decode step failed: {result.stderr.strip()[-2000:]}")


def _child_main(recipe: ModelRecipe, kind: str, out: str) -> None:
    from thrifty.kv.cache import KVCache
    from thrifty.loading.source import open_model_source
    from thrifty.models.registry import load_model
    from thrifty.spec.layer_skip import layer_skip_view

    cpu = torch.device("cpu")
    model = load_model(open_model_source(recipe.model_path), recipe.torch_dtype, cpu, recipe.weights)
    if recipe.kept_layers is not None:
        model = layer_skip_view(model, recipe.kept_layers)
    config = dataclasses.replace(model.config, num_layers=len(model.model.layers))
    model.bind_kv_cache(KVCache(config, 4, 16, recipe.torch_dtype, cpu).layers)
    build(model, recipe.torch_dtype, kind, out)


# -- running ----------------------------------------------------------------------------------------

class CompiledDecode:
    """Runs `model.body` for DecodeMetadata steps through AOTInductor graphs; eagerly where none applies,
    and for good after any failure (`error` says why)."""

    def __init__(self, model: CausalLM, recipe: ModelRecipe) -> None:
        self.model = model
        self.recipe = recipe
        self.slots = tensor_slots(model)
        self.error: str | None = None
        self.built = 0  # graphs built (not found in the cache) by this instance
        self._graphs: dict[str, torch._C._aoti.AOTIModelPackageLoader] = {}
        self._tensors: list[torch.Tensor] = []
        int4 = any(isinstance(m, Linear) and isinstance(m.packed, Int4Weight) for m in model.modules())
        self.kinds = GRAPHS + ((TILES_GRAPH,) if int4 and amx_available() else ())

    def load(self) -> float:
        """Build (or find in the cache) and load the graphs; return the seconds it took."""
        start = time.perf_counter()
        try:
            for kind in self.kinds:
                self._graphs[kind] = self._load(kind)
            self._tensors = [slot.get() for slot in self.slots]
        except Exception as exc:  # noqa: BLE001 - a compiler failure must leave a working engine
            self._fail(exc)
        return time.perf_counter() - start

    def _load(self, kind: str) -> torch._C._aoti.AOTIModelPackageLoader:
        path = _cache_dir() / f"{cache_key(self.model, self.slots, kind)}.pt2"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial.pt2")
            _build_in_child(self.recipe, kind, partial)
            partial.replace(path)  # atomic: a concurrent start never loads half a file
            self.built += 1
            _prune_cache(path.parent, time.time())
        else:
            with contextlib.suppress(OSError):  # pruned by another start just now: the load below says so
                os.utime(path)  # used: keeps it from being pruned
        # model name, run single-threaded (one caller), one runner, CPU
        return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, -1)

    def _fail(self, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        self._graphs.clear()
        log.warning("compiled decode steps unavailable; running eagerly: %s", self.error)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, meta: DecodeMetadata, exact: bool = False
                 ) -> torch.Tensor:
        """The body's output for a step; `exact`: some sequence speculates, so the step must round as
        its verify steps will (not through the AMX template, thrifty.quant.int4_tiles)."""
        batch, context = meta.slot_ids.shape
        query = x.shape[0] // batch
        kind = _graph_kind(batch, query)
        if kind == "batch" and not exact and TILES_GRAPH in self._graphs:
            kind = TILES_GRAPH
        graph = self._graphs.get(kind) if context >= 2 else None
        if graph is None:
            return self.model.body(x, positions, meta)
        inputs = [x.view(batch, query, -1), positions.view(batch, query), meta.slot_mapping.view(batch, query),
                  meta.slot_ids, meta.query_slots]
        if meta.allowed is not None:
            inputs.append(meta.allowed)
        try:
            return graph.boxed_run(inputs + self._tensors)[0]
        except Exception as exc:  # noqa: BLE001 - the eager run writes the same K/V the failed one may have
            self._fail(exc)
            return self.model.body(x, positions, meta)


def _graph_kind(batch: int, query: int) -> str | None:
    """The graph for a step of `batch` sequences with `query` new tokens each, if any takes it."""
    if query == 1:
        return "single" if batch == 1 else "batch" if batch <= MAX_BATCH else None
    return "verify" if batch == 1 and query <= MAX_QUERY else None


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    _child_main(ModelRecipe(**request["recipe"]), request["kind"], request["out"])
