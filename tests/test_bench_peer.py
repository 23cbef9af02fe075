"""The vLLM peer of the decode benchmark (msattn.bench.peer): the shim, the folder lookup, the
cache-layout conversion, the selection agreement, and (where vLLM's files are in .peers/ and
Triton interprets on the CPU) vLLM's selection against msattn's reference."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from msattn import paged
from msattn.bench import peer
from msattn.cache import FP8_DTYPE, dequantize_index_keys, gather_paged, quantize_index_keys

HAS_VLLM = importlib.util.find_spec("vllm") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Stand-ins for vLLM's two files: the same imports, and what they got from them.
FAKE_FILE = """
from vllm.platforms import current_platform
from vllm.triton_utils import tl, triton
from vllm.utils.math_utils import round_up

PDL = current_platform.is_arch_support_pdl()
CUDA = current_platform.is_cuda()
ROUNDED = round_up(17, 16)
TRITON, TL = triton, tl
"""


@pytest.fixture
def fake_peer_dir(tmp_path):
    for name in peer.PEER_FILES:
        (tmp_path / name).write_text(FAKE_FILE)
    return tmp_path


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed: its own modules serve the imports")
def test_shim_serves_the_three_imports(fake_peer_dir):
    import triton
    import triton.language as tl

    modules = peer.load(fake_peer_dir)
    for module in (modules.index_topk, modules.sparse_attn):
        assert module.ROUNDED == 32 and module.TRITON is triton and module.TL is tl
        assert module.PDL is (torch.cuda.is_available()
                              and torch.cuda.get_device_capability() >= (9, 0))
        assert module.CUDA is torch.cuda.is_available()
    assert peer.load(fake_peer_dir) is modules  # imported once per folder


def test_available_and_folder(fake_peer_dir, tmp_path_factory, monkeypatch):
    assert peer.available(fake_peer_dir)
    half = tmp_path_factory.mktemp("half")
    (half / peer.PEER_FILES[0]).write_text(FAKE_FILE)
    assert not peer.available(half)
    with pytest.raises(FileNotFoundError, match="sparse_attn.py"):
        peer.load(half)
    monkeypatch.setenv(peer.PEER_DIR_ENV, str(fake_peer_dir))
    assert peer.peer_dir() == fake_peer_dir and peer.available()
    monkeypatch.delenv(peer.PEER_DIR_ENV)
    assert peer.peer_dir() == peer.DEFAULT_PEER_DIR
    assert peer.DEFAULT_PEER_DIR.parts[-2:] == (".peers", "vllm_minimax_m3")


def test_unsupported_reasons():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    ok = dict(page_size=128, index_dim=128, q_tokens_per_request=[2, 2], device=cuda)
    assert peer.unsupported_reason(**ok) is None
    assert peer.unsupported_reason(**{**ok, "device": cpu}) == "needs CUDA"
    assert "not 64" in peer.unsupported_reason(**{**ok, "page_size": 64})
    assert "power-of-two" in peer.unsupported_reason(**{**ok, "index_dim": 96})
    assert "same number" in peer.unsupported_reason(**{**ok, "q_tokens_per_request": [1, 2]})


def _paged(num_pages=5, page_size=4, groups=2, head_dim=3, index_dim=8):
    torch.manual_seed(0)
    k = torch.randn(num_pages, page_size, groups, head_dim)
    v = torch.randn(num_pages, page_size, groups, head_dim)
    keys = torch.randn(num_pages, page_size, index_dim, dtype=torch.bfloat16)
    block_table = torch.tensor([[3, 0, -1], [4, 1, 2]], dtype=torch.int32)
    seq_lens = torch.tensor([6, 11], dtype=torch.int32)
    return k, v, keys, block_table, seq_lens


def test_convert_cache_layout():
    """vLLM's kv_cache [num_pages, G, page_size, 2D] holds K then V of every (page, group,
    position); gathered back along the block table it gives each request's K and V sequence."""
    k, v, keys, block_table, seq_lens = _paged()
    converted = peer.convert_cache(k, v, keys, block_table, seq_lens)
    kv = converted.kv_cache
    assert kv.shape == (5, 2, 4, 6) and kv.is_contiguous()
    assert torch.equal(kv[3, 1, 2, :3], k[3, 2, 1]) and torch.equal(kv[3, 1, 2, 3:], v[3, 2, 1])
    for name, source, part in (("k", k, slice(0, 3)), ("v", v, slice(3, 6))):
        expected, cu = gather_paged(source, block_table, seq_lens)  # [total, G, D]
        back, _ = gather_paged(kv[..., part].transpose(1, 2), block_table, seq_lens)
        assert torch.equal(back, expected), name
        assert cu.tolist() == [0, 6, 17]
    assert converted.index_cache.dtype == torch.bfloat16
    assert torch.equal(converted.index_cache, keys)
    assert converted.block_table is block_table and converted.seq_lens is seq_lens


def test_convert_fp8_index_keys_drops_the_scale():
    """vLLM's fp8 keys are e4m3 without a scale: msattn's scaled keys, dequantised."""
    k, v, keys, block_table, seq_lens = _paged()
    quantized, scale = quantize_index_keys(keys * 8)
    converted = peer.convert_cache(k, v, quantized, block_table, seq_lens, scale)
    assert converted.index_cache.dtype == FP8_DTYPE and converted.index_cache.shape == (5, 4, 8)
    dequantized = dequantize_index_keys(quantized, scale)
    assert torch.equal(converted.index_cache, dequantized.to(FP8_DTYPE))
    error = (converted.index_cache.float() - keys.float() * 8).abs()
    assert (error <= 2 ** -3 * (keys.float() * 8).abs() + 1e-2).all()


def test_selection_agreement_compares_sets():
    a = torch.tensor([[[0, 3, 5], [1, 2, -1]], [[4, 2, 0], [0, 1, 2]]], dtype=torch.int32)
    b = torch.tensor([[[5, 0, 3], [2, 1, -1]], [[4, 2, 1], [2, 0, 1]]], dtype=torch.int32)
    assert peer.selection_agreement(a, b) == pytest.approx(0.75)
    assert peer.selection_agreement(a, a) == 1.0


# ----------------------------------------------------------------------------------------------
# vLLM's kernels themselves (needs .peers/; Triton's interpreter)
# ----------------------------------------------------------------------------------------------

def _one_config(modules, monkeypatch):
    """Autotuned kernels keep one config (the interpreter cannot benchmark configs)."""
    from triton.runtime.autotuner import Autotuner

    for module in (modules.index_topk, modules.sparse_attn):
        for value in vars(module).values():
            while value is not None and not isinstance(value, Autotuner):
                value = getattr(value, "fn", None)
            if value is not None:
                small = min(value.configs, key=lambda config: config.kwargs["BLOCK_SIZE_K"])
                monkeypatch.setattr(value, "configs", [small])


@pytest.mark.skipif(not peer.available(), reason="vLLM's files are not in .peers/")
@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("init_blocks", [0, 1])
def test_vllm_selection_matches_reference(monkeypatch, init_blocks):
    """vLLM's decode selection (block scores, partial top-k, merge) picks msattn's reference
    sets: random page order, -1-padded table, 3 tokens per request, unequal lengths. (float32
    data: the interpreter mis-computes vLLM's bf16 dots; its attention kernel does not run in
    the interpreter, "mask has unsupported dtype".)"""
    modules = peer.load()
    _one_config(modules, monkeypatch)
    torch.manual_seed(init_blocks)
    batch, q_tokens, groups, index_dim, page, topk = 2, 3, 2, 16, peer.PEER_PAGE_SIZE, 3
    seq_lens = torch.tensor([700, 300], dtype=torch.int32)
    pages = 6
    keys = torch.randn(batch * pages, page, index_dim)
    order = torch.randperm(batch * pages).view(batch, pages).to(torch.int32)
    block_table = torch.cat([order, torch.full((batch, 1), -1, dtype=torch.int32)], dim=1)
    qi = torch.randn(batch * q_tokens, groups, index_dim)
    cu_seqlens_q = torch.arange(0, batch * q_tokens + 1, q_tokens, dtype=torch.int32)
    q = torch.randn(batch * q_tokens, 4, 16)
    kv = torch.randn(batch * pages, page, groups, 16)
    cache = peer.convert_cache(kv, kv, keys, block_table, seq_lens)
    step = peer.make_peer_step(modules, q, qi, cache, max_seq_len=700, topk=topk,
                               init_blocks=init_blocks, local_blocks=1, softmax_scale=0.25,
                               decode_query_len=q_tokens)
    assert step.topk_idx.shape == (groups, batch * q_tokens, topk)
    assert step.output.shape == q.shape
    modules.index_topk.minimax_m3_index_decode(
        qi, cache.index_cache, cache.block_table, cache.seq_lens, 700, topk, init_blocks, 1,
        groups, q_tokens, q_tokens, out=step.topk_idx)
    expected = paged.msa_paged_select(qi, keys, block_table, cu_seqlens_q, seq_lens, topk=topk,
                                      init_blocks=init_blocks, local_blocks=1,
                                      backend="reference")
    assert peer.selection_agreement(step.topk_idx, expected) == 1.0


def _selection_only_peer(monkeypatch):
    """vLLM's modules with its real selection kernels and a stand-in for its attention (which
    does not run in the interpreter) that records the query rows of each call."""
    import types

    real = peer.load()
    _one_config(real, monkeypatch)
    calls = []
    stub = types.SimpleNamespace(minimax_m3_sparse_attn=lambda q, *args: calls.append(q.shape[0]))
    return peer.PeerModules(index_topk=real.index_topk, sparse_attn=stub), calls


@pytest.mark.skipif(not peer.available(), reason="vLLM's files are not in .peers/")
@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")
def test_vllm_prefill_selection_matches_reference(monkeypatch):
    """vLLM's chunked prefill (:func:`peer.make_peer_prefill`: score, top-k and attention per
    chunk of queries over the prefix and the chunk) selects msattn's reference sets for every
    token: 5 pages, chunks of 256 queries (the last one partial). The attention kernel does not
    run in the interpreter, so a stand-in records its calls (each chunk once, in order)."""
    from msattn import reference

    modules, calls = _selection_only_peer(monkeypatch)
    torch.manual_seed(3)
    length, groups, index_dim = 5 * peer.PEER_PAGE_SIZE, 2, 16
    k, v = torch.randn(length, groups, 16), torch.randn(length, groups, 16)
    ki, qi = torch.randn(length, index_dim), torch.randn(length, groups, index_dim)
    q = torch.randn(length, 4, 16)
    cache = peer.contiguous_cache(k, v, ki)
    assert cache.kv_cache.shape == (5, groups, peer.PEER_PAGE_SIZE, 32)
    prefill = peer.make_peer_prefill(modules, q, qi, cache, topk=3, init_blocks=1, local_blocks=1,
                                     softmax_scale=0.25, chunk=256)
    prefill.run()
    assert calls == [256, 256, 128]
    cu = torch.tensor([0, length], dtype=torch.int32)
    expected = reference.select_blocks(qi, ki, cu, cu, block_size=peer.PEER_PAGE_SIZE, topk=3,
                                       init_blocks=1, local_blocks=1)
    assert peer.selection_agreement(prefill.topk_idx, expected) == 1.0
    with pytest.raises(ValueError, match="whole 128-token pages"):
        peer.contiguous_cache(k[:100], v[:100], ki[:100])


@pytest.mark.skipif(not peer.available(), reason="vLLM's files are not in .peers/")
@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")
def test_vllm_chunked_prefill_selection_matches_reference(monkeypatch):
    """vLLM's chunked prefill of a batch (:func:`peer.make_peer_chunked`): two requests of 100
    new tokens after prefixes of 300 and 500, pages in random order; its selection is msattn's
    reference (the attention stand-in sees the whole batch once)."""
    modules, calls = _selection_only_peer(monkeypatch)
    torch.manual_seed(5)
    page, groups, index_dim = peer.PEER_PAGE_SIZE, 2, 16
    seq_lens = torch.tensor([400, 600], dtype=torch.int32)
    pages = 5
    keys = torch.randn(2 * pages, page, index_dim)
    table = torch.randperm(2 * pages).view(2, pages).to(torch.int32)
    kv = torch.randn(2 * pages, page, groups, 16)
    cu_seqlens_q = torch.tensor([0, 100, 200], dtype=torch.int32)
    qi = torch.randn(200, groups, index_dim)
    cache = peer.convert_cache(kv, kv, keys, table, seq_lens)
    step = peer.make_peer_chunked(modules, torch.randn(200, 4, 16), qi, cache, cu_seqlens_q,
                                  max_query_len=100, max_seq_len=600, topk=3, init_blocks=0,
                                  local_blocks=1, softmax_scale=0.25)
    step.run()
    assert calls == [200]
    expected = paged.msa_paged_select(qi, keys, table, cu_seqlens_q, seq_lens, topk=3,
                                      init_blocks=0, local_blocks=1, backend="reference")
    assert peer.selection_agreement(step.topk_idx, expected) == 1.0
