"""Loading with a low peak RSS changes nothing a model computes: lazy GGUF metadata, dropped file
pages, and an embedding table kept in its GGUF blocks all give the same values as before."""

import gguf
import numpy as np
import pytest
import torch

import thrifty.loading.gguf as gguf_loading
from thrifty.loading.gguf import open_gguf
from thrifty.loading.source import open_model_source
from thrifty.models.registry import load_model
from thrifty.quant.packed import pack


@pytest.mark.parametrize("fixture", ["tiny_llama_gguf", "tiny_gemma3_gguf"])
def test_lazy_metadata_arrays_read_as_gguf_py_reads_them(fixture, request, monkeypatch):
    path = request.getfixturevalue(fixture)
    monkeypatch.setattr(gguf_loading, "_LAZY_ARRAY_LENGTH", 4)  # the tiny vocabularies are short
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    assert any(isinstance(f, gguf_loading._LazyArrayField) for f in ours.fields.values())
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        mine = ours.fields[key]
        assert (mine.name, mine.offset, mine.types, mine.data) == (field.name, field.offset, field.types, field.data)
        assert mine.contents() == field.contents()
    assert [(t.name, t.data_offset) for t in ours.tensors] == [(t.name, t.data_offset) for t in theirs.tensors]


def test_released_tensor_pages_read_back_unchanged(tiny_llama_gguf):
    reader = open_gguf(tiny_llama_gguf)
    before = {t.name: np.array(t.data) for t in reader.tensors}
    for tensor in reader.tensors:
        reader.release(tensor)
    assert all(np.array_equal(np.array(t.data), before[t.name]) for t in reader.tensors)


@pytest.mark.parametrize("fixture", ["tiny_llama_gguf", "tiny_gemma3_gguf"])  # untied and tied heads
@pytest.mark.parametrize("choice", ["auto", "int8", "bf16"])
def test_embedding_in_blocks_matches_the_float_table(fixture, choice, request):
    path = request.getfixturevalue(fixture)
    cpu = torch.device("cpu")
    dense = load_model(open_model_source(path), torch.float32, cpu, "fp32")
    model = load_model(open_model_source(path), torch.float32, cpu, choice)
    embedding = model.model.embed_tokens
    assert embedding.packed is not None and embedding.weight.numel() == 0
    table = dense.model.embed_tokens.weight.detach()
    ids = torch.tensor([[3, 0, 17], [5, 5, table.shape[0] - 1]])
    assert torch.equal(embedding(ids), table[ids])
    if model.config.tie_word_embeddings:  # the head is packed from the blocks as from the float table
        expected = pack(table, "int8" if choice == "auto" else choice)
        assert torch.equal(model.lm_head.packed.dequantize(), expected.dequantize())


def test_gguf_choice_keeps_a_tied_embedding_dense(tiny_gemma3_gguf):
    model = load_model(open_model_source(tiny_gemma3_gguf), torch.float32, torch.device("cpu"), "gguf")
    assert model.model.embed_tokens.packed is None and model.lm_head.packed is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
