"""Paged caches (msattn.cache): fp8 index keys, writes through block tables, gather, the cache
object and its allocator, argument checks."""

from __future__ import annotations

import random

import pytest
import torch

import msattn
from msattn import cache as C
from msattn.cache import (MSAPagedCache, build_block_table, dequantize_index_keys, dequantize_kv,
                          gather_paged, quantize_index_keys, quantize_kv, write_paged_cache)
from msattn.ops.nvfp4 import dequantize_nvfp4, quantize_nvfp4

FP8 = torch.float8_e4m3fn
G, D, DI, PAGE = 2, 8, 16, 4


# ----------------------------------------------------------------------------------------------
# FP8 index keys
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_error_bound(dtype):
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-6, 4, 64)[:, None]  # rows from tiny to large
    x = (torch.randn(64, 128, generator=gen) * magnitudes).to(dtype)
    keys, scale = quantize_index_keys(x)
    assert keys.dtype == FP8 and keys.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (64,)
    xf = x.float()
    torch.testing.assert_close(scale, xf.abs().amax(-1) / 448)
    back = dequantize_index_keys(keys, scale)
    assert back.dtype == torch.float32
    # e4m3: 3 mantissa bits (relative rounding error <= 2^-4); below its smallest normal (2^-6 of
    # the scaled range) the step is 2^-9, i.e. an absolute error <= 2^-10 * scale.
    bound = 2 ** -4 * xf.abs() + 2 ** -10 * scale[:, None] * (1 + 1e-6)
    assert ((back - xf).abs() <= bound).all()
    # The largest value of every row maps to +-448 exactly (up to the float32 division).
    torch.testing.assert_close(keys.float().abs().amax(-1), torch.full((64,), 448.0))
    relative = ((back - xf).norm(dim=-1) / xf.norm(dim=-1))
    assert relative.max() < 2 ** -4


def test_quantize_zero_rows_and_leading_dims():
    x = torch.randn(3, 5, DI)
    x[1, 2] = 0
    x[0, 0] = -0.0
    keys, scale = quantize_index_keys(x)
    assert keys.shape == (3, 5, DI) and scale.shape == (3, 5)
    assert scale[1, 2] > 0 and scale[0, 0] > 0  # never a zero scale
    back = dequantize_index_keys(keys, scale)
    assert torch.equal(back[1, 2], torch.zeros(DI)) and torch.equal(back[0, 0], torch.zeros(DI))
    assert torch.isfinite(back).all()
    # A row with one huge outlier: the other values may flush towards zero but stay finite.
    y = torch.ones(1, DI)
    y[0, 3] = 1e6
    keys, scale = quantize_index_keys(y)
    assert torch.isfinite(keys.float()).all() and keys.float().abs().max() == 448


def test_quantize_rejects_bad_input():
    with pytest.raises(TypeError, match="index_keys"):
        quantize_index_keys(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="index_keys"):
        quantize_index_keys([1.0, 2.0])
    with pytest.raises(TypeError, match="keys_fp8"):
        dequantize_index_keys(torch.ones(4, 8), torch.ones(4))
    keys, scale = quantize_index_keys(torch.randn(4, 8))
    with pytest.raises(ValueError, match="scale"):
        dequantize_index_keys(keys, scale[:3])
    with pytest.raises(TypeError, match="scale"):
        dequantize_index_keys(keys, scale.double())


# ----------------------------------------------------------------------------------------------
# FP8 K/V
# ----------------------------------------------------------------------------------------------

def _kv_bound(x, scale):
    """e4m3 rounding of ``x [..., G, D]`` quantised with ``scale []`` or ``[G]``: 2^-4 of each
    value, 2^-10 of the scale below the normal range."""
    factor = scale[:, None] if scale.dim() else scale
    return 2 ** -4 * x.abs() + 2 ** -10 * factor * (1 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_kv_per_head_round_trip(dtype):
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.tensor([1e-3, 1.0, 300.0])[:, None]  # one size per KV head
    x = (torch.randn(5, 7, 3, 64, generator=gen) * magnitudes).to(dtype)
    x_fp8, scale = quantize_kv(x)
    assert x_fp8.dtype == FP8 and x_fp8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (3,)
    xf = x.float()
    torch.testing.assert_close(scale, xf.abs().amax(dim=(0, 1, 3)) / 448)
    back = dequantize_kv(x_fp8, scale)
    assert back.dtype == torch.float32 and ((back - xf).abs() <= _kv_bound(xf, scale)).all()
    assert torch.equal(x_fp8.float().abs().amax(dim=(0, 1, 3)), torch.full((3,), 448.0))


def test_quantize_kv_given_scales():
    x = torch.randn(6, 2, 16) * torch.tensor([0.5, 4.0])[:, None]
    for scale in (torch.tensor(4.0 * 4 / 448), torch.tensor([0.5 * 4 / 448, 4.0 * 4 / 448])):
        x_fp8, same = quantize_kv(x, scale)
        assert same is scale
        back = dequantize_kv(x_fp8, scale)
        assert ((back - x).abs() <= _kv_bound(x, scale)).all()
    x_fp8, _ = quantize_kv(x * 1000, torch.tensor(1.0))  # beyond 448 * scale: clamped
    assert x_fp8.float().abs().max() == 448
    zeros, scale = quantize_kv(torch.zeros(3, 2, 8))  # an all-zero head gets scale 1
    assert torch.equal(scale, torch.ones(2)) and not zeros.float().any()
    empty, scale = quantize_kv(torch.zeros(0, 2, 8))
    assert empty.shape == (0, 2, 8) and torch.equal(scale, torch.ones(2))


def test_quantize_kv_rejects_bad_input():
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., G, D\]"):
        quantize_kv(torch.randn(8))
    with pytest.raises(TypeError, match="x must have dtype"):
        quantize_kv(torch.ones(4, 2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"scale must have shape \[\] \(per tensor\) or \[G=2\]"):
        quantize_kv(torch.randn(4, 2, 8), torch.ones(3))
    with pytest.raises(TypeError, match="scale must have dtype float32"):
        quantize_kv(torch.randn(4, 2, 8), torch.ones(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="x_fp8"):
        dequantize_kv(torch.randn(4, 2, 8), torch.ones(2))


def test_write_fp8_kv_caches():
    """Varlen writes (a prefill, then decode steps) into fp8 K/V pages in a shuffled order, with
    per-head K and per-tensor V scales: the pages hold quantize_kv of the tokens, bit for bit."""
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache, index_cache, _ = make_caches(20, head_major=True, dtype=FP8)
    k_scale, v_scale = torch.tensor([0.01, 0.02]), torch.tensor(0.05)
    table = torch.randperm(19, generator=gen)[:12].to(torch.int32).view(3, 4)
    table[1, 2:] = -1
    truth_k, truth_v, lens = [[], [], []], [[], [], []], [0, 0, 0]
    for new_tokens in ([9, 2, 13], [1, 1, 1], [0, 3, 1]):
        ks = [torch.randn(n, G, D, generator=gen) for n in new_tokens]
        vs = [torch.randn(n, G, D, generator=gen).bfloat16() for n in new_tokens]
        lens = [length + n for length, n in zip(lens, new_tokens)]
        cu = torch.tensor([0, *new_tokens]).cumsum(0).to(torch.int32)
        write_paged_cache(torch.cat(ks), torch.cat(vs), torch.randn(sum(new_tokens), DI),
                          k_cache, v_cache, index_cache, table, cu,
                          torch.tensor(lens, dtype=torch.int32), k_scale=k_scale, v_scale=v_scale,
                          check_values=True)
        for b in range(3):
            truth_k[b].append(ks[b]), truth_v[b].append(vs[b])
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    for cache, truth, scale in ((k_cache, truth_k, k_scale), (v_cache, truth_v, v_scale)):
        got, _ = gather_paged(cache, table, seq_lens)
        expected = torch.cat([torch.cat(parts) for parts in truth])
        assert torch.equal(got.view(torch.uint8), quantize_kv(expected, scale)[0].view(torch.uint8))
        back = dequantize_kv(got, scale)
        assert ((back - expected.float()).abs() <= _kv_bound(expected.float(), scale)).all()
    assert not k_cache[19].float().any()  # the spare page is never written


@pytest.mark.parametrize("overrides, error, message", [
    (dict(fp8=True, k_scale=None), ValueError, "k_scale .* is required"),
    (dict(fp8=True, v_scale=torch.ones(3)), ValueError, "v_scale must have shape"),
    (dict(fp8=True, k_scale=torch.ones(G, dtype=torch.float16)), TypeError, "k_scale must have dtype"),
    (dict(fp8=False), ValueError, "k_scale is only used with float8_e4m3fn K/V caches"),
    (dict(fp8=True, v_cache=torch.zeros(8, PAGE, G, D)), TypeError, "v_cache"),
])
def test_write_fp8_kv_rejects(overrides, error, message):
    fp8 = overrides.pop("fp8")
    k_cache, v_cache, index_cache, _ = make_caches(8, dtype=FP8 if fp8 else torch.float32)
    args = _write_args(k_cache=k_cache, v_cache=overrides.pop("v_cache", v_cache))
    scales = dict(k_scale=torch.ones(G), v_scale=torch.tensor(1.0))
    scales.update(overrides)
    args.pop("index_scale")
    with pytest.raises(error, match=message):
        write_paged_cache(*args.values(), **scales)


def test_paged_cache_fp8_kv():
    c = MSAPagedCache(8, PAGE, G, D, DI, num_layers=2, dtype=FP8, index_dtype=FP8,
                      k_scale=torch.tensor([0.01, 0.1]), v_scale=0.05, head_major=True)
    assert c.k_cache[1].dtype == FP8 and c.v_cache[0].dtype == FP8
    assert c.k_scale[0].shape == (G,) and c.v_scale[1].shape == ()
    assert c.v_scale[1].dtype == torch.float32 and torch.equal(c.v_scale[1], torch.tensor(0.05))
    assert c.k_scale[0] is not c.k_scale[1]  # one per layer
    c.k_scale[1].mul_(2)  # a layer's own scale, set before its first write
    table = c.block_table([c.allocate(6)])
    k, v = torch.randn(6, G, D), torch.randn(6, G, D)
    lengths = torch.tensor([6], dtype=torch.int32)
    for layer in range(2):
        c.append(layer, k, v, torch.randn(6, DI), table, torch.tensor([0, 6], dtype=torch.int32),
                 lengths)
        got = c.layer(layer)
        assert got["k_scale"] is c.k_scale[layer] and got["v_scale"] is c.v_scale[layer]
        for name, truth in (("k", k), ("v", v)):
            scale = got[f"{name}_scale"]
            back = dequantize_kv(gather_paged(got[f"{name}_cache"], table, lengths)[0], scale)
            assert ((back - truth).abs() <= _kv_bound(truth, scale)).all()
    with pytest.raises(ValueError, match="k_scale .* is required"):
        MSAPagedCache(8, PAGE, G, D, DI, dtype=FP8, v_scale=1.0)
    with pytest.raises(ValueError, match="v_scale is only used"):
        MSAPagedCache(8, PAGE, G, D, DI, v_scale=1.0)


# ----------------------------------------------------------------------------------------------
# Serving simulation: write then gather
# ----------------------------------------------------------------------------------------------

def make_caches(num_pages, *, head_major=False, index_dtype=torch.bfloat16, dtype=torch.float32):
    """Zeroed caches; head-major K/V are permuted views of [num_pages, G, PAGE, D] buffers."""
    if head_major:
        k_cache = torch.zeros(num_pages, G, PAGE, D, dtype=dtype).permute(0, 2, 1, 3)
        v_cache = torch.zeros(num_pages, G, PAGE, D, dtype=dtype).permute(0, 2, 1, 3)
        assert not k_cache.is_contiguous()
    else:
        k_cache = torch.zeros(num_pages, PAGE, G, D, dtype=dtype)
        v_cache = torch.zeros(num_pages, PAGE, G, D, dtype=dtype)
    index_cache = torch.zeros(num_pages, PAGE, DI, dtype=index_dtype)
    index_scale = torch.zeros(num_pages, PAGE) if index_dtype == FP8 else None
    return k_cache, v_cache, index_cache, index_scale


class Server:
    """Requests growing step by step in pages taken at random from a shuffled pool; keeps the
    ground-truth contiguous K, V and index keys of every request."""

    def __init__(self, num_requests, num_pages, max_pages, *, seed=0, pad=-1, **cache_kwargs):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.num_pages, self.max_pages, self.pad = num_pages, max_pages, pad
        # The last page is never handed out: a -1 read or write would land there.
        self.pool = list(range(num_pages - 1))
        self.rng.shuffle(self.pool)
        self.pages = [[] for _ in range(num_requests)]
        self.truth = [dict(k=[], v=[], ki=[]) for _ in range(num_requests)]
        self.caches = make_caches(num_pages, **cache_kwargs)
        self.dtype = self.caches[0].dtype

    def block_table(self):
        table = torch.full((len(self.pages), self.max_pages), self.pad, dtype=torch.int32)
        for b, pages in enumerate(self.pages):
            table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return table

    def step(self, new_tokens, check_values=False):
        """Append ``new_tokens[b]`` tokens (random data, never zero) to every request ``b``."""
        ks, vs, kis = [], [], []
        for b, n in enumerate(new_tokens):
            length = sum(t.shape[0] for t in self.truth[b]["k"]) + n
            while len(self.pages[b]) * PAGE < length:
                self.pages[b].append(self.pool.pop())
            k = torch.randn(n, G, D, generator=self.gen).to(self.dtype) + 3
            v = torch.randn(n, G, D, generator=self.gen).to(self.dtype) - 3
            ki = torch.randn(n, DI, generator=self.gen) * 2 + 5
            for name, t in (("k", k), ("v", v), ("ki", ki)):
                self.truth[b][name].append(t)
            ks.append(k), vs.append(v), kis.append(ki)
        cu = torch.tensor([0, *new_tokens], dtype=torch.int64).cumsum(0).to(torch.int32)
        k_cache, v_cache, index_cache, index_scale = self.caches
        write_paged_cache(torch.cat(ks), torch.cat(vs), torch.cat(kis), k_cache, v_cache,
                          index_cache, self.block_table(), cu, self.seq_lens(),
                          index_scale=index_scale, check_values=check_values)

    def seq_lens(self):
        return torch.tensor([sum(t.shape[0] for t in r["k"]) for r in self.truth], dtype=torch.int32)

    def check(self):
        k_cache, v_cache, index_cache, index_scale = self.caches
        table, lens = self.block_table(), self.seq_lens()
        k, cu = gather_paged(k_cache, table, lens)
        v, cu_v = gather_paged(v_cache, table, lens)
        ki, cu_i = gather_paged(index_cache, table, lens)
        expected_cu = torch.tensor([0, *lens.tolist()]).cumsum(0).to(torch.int32)
        assert cu.dtype == torch.int32 and torch.equal(cu, expected_cu)
        assert torch.equal(cu_v, cu) and torch.equal(cu_i, cu)
        truth = {name: torch.cat([torch.cat(r[name]) for r in self.truth])
                 for name in ("k", "v", "ki")}
        assert torch.equal(k, truth["k"]) and torch.equal(v, truth["v"])
        if index_scale is None:
            assert torch.equal(ki, truth["ki"].to(index_cache.dtype))
        else:
            scale, _ = gather_paged(index_scale, table, lens)
            keys, expected_scale = quantize_index_keys(truth["ki"])
            assert torch.equal(scale, expected_scale)
            assert torch.equal(ki.view(torch.uint8), keys.view(torch.uint8))
            back = dequantize_index_keys(ki, scale)
            assert ((back - truth["ki"]).abs() <= 2 ** -4 * truth["ki"].abs() + 1e-6).all()
        # The never-used last page stays untouched (no write through a -1 entry).
        for t in self.caches:
            if t is not None:
                assert not t[-1].float().any()


@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.bfloat16, torch.float32, FP8])
def test_prefill_then_decode_round_trip(head_major, index_dtype):
    server = Server(4, num_pages=160, max_pages=40, head_major=head_major,
                    index_dtype=index_dtype, seed=1)
    # Varlen prefill: an empty request, partial pages, an exact page multiple.
    server.step([13, 0, 8, 29])
    server.check()
    rng = random.Random(2)
    for _ in range(6):  # decode steps of 1..16 tokens (some requests idle)
        server.step([rng.choice([0, 1, 2, 5, 16, rng.randint(1, 16)]) for _ in range(4)],
                    check_values=True)
        server.check()


@pytest.mark.parametrize("pad", [-1, 10 ** 6, -(2 ** 31)])
def test_block_table_padding_never_read(pad):
    """Entries past a request's pages hold garbage; indexing them would fail on the CPU."""
    server = Server(3, num_pages=40, max_pages=12, pad=pad, seed=3)
    server.step([7, 1, 12])
    for step in ([1, 1, 1], [16, 3, 0], [2, 9, 4]):
        server.step(step)
        server.check()


def test_half_precision_caches_and_casts():
    server = Server(2, num_pages=30, max_pages=10, dtype=torch.bfloat16,
                    index_dtype=torch.float16, seed=4)
    server.step([9, 4])
    server.step([3, 16])
    server.check()


def test_write_does_not_synchronise(monkeypatch):
    """No host reads of tensor values on the write path (needed for CUDA-graph capture)."""
    server = Server(3, num_pages=30, max_pages=10, index_dtype=FP8, seed=5)
    server.step([5, 6, 7])

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in write_paged_cache")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    k_cache, v_cache, index_cache, index_scale = server.caches
    cu = torch.tensor([0, 1, 3, 4], dtype=torch.int32)
    lens = torch.tensor([6, 8, 8], dtype=torch.int32)
    table = torch.full((3, 10), -1, dtype=torch.int32)
    table[:, :2] = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    write_paged_cache(torch.randn(4, G, D), torch.randn(4, G, D), torch.randn(4, DI), k_cache,
                      v_cache, index_cache, table, cu, lens, index_scale=index_scale)
    monkeypatch.undo()
    # Request 1's new tokens are its positions 6 and 7: page 3, slots 2 and 3.
    assert index_scale[3, 2] > 0 and index_scale[3, 3] > 0


def test_token_slots():
    table = torch.tensor([[5, 2, -1], [7, 0, 3]], dtype=torch.int32)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    lens = torch.tensor([5, 9], dtype=torch.int32)  # request 0: positions 3, 4; request 1: 6, 7, 8
    pages, slots = C.token_slots(table, cu, lens, 5, PAGE)
    assert pages.tolist() == [5, 2, 0, 0, 3]
    assert slots.tolist() == [3, 0, 2, 3, 0]


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------

def _write_args(**overrides):
    k_cache, v_cache, index_cache, _ = make_caches(8)
    args = dict(k=torch.randn(3, G, D), v=torch.randn(3, G, D), index_keys=torch.randn(3, DI),
                k_cache=k_cache, v_cache=v_cache, index_cache=index_cache,
                block_table=torch.tensor([[0, 1], [2, -1]], dtype=torch.int32),
                cu_seqlens_q=torch.tensor([0, 2, 3], dtype=torch.int32),
                seq_lens=torch.tensor([6, 3], dtype=torch.int32), index_scale=None)
    args.update(overrides)
    return args


def _write(**overrides):
    args = _write_args(**overrides)
    index_scale = args.pop("index_scale")
    check_values = args.pop("check_values", False)
    write_paged_cache(*args.values(), index_scale=index_scale, check_values=check_values)


def test_write_args_ok():
    _write()
    _write(check_values=True)


@pytest.mark.parametrize("overrides, error, name", [
    (dict(k=torch.randn(3, G + 1, D)), ValueError, "k_cache"),
    (dict(k=torch.randn(3, G, D).numpy()), TypeError, "k"),
    (dict(k=torch.randn(3, G, D, dtype=torch.float64)), TypeError, "k"),
    (dict(v=torch.randn(2, G, D)), ValueError, "v"),
    (dict(index_keys=torch.randn(3, DI + 1)), ValueError, "index_cache"),
    (dict(index_keys=torch.randn(2, DI)), ValueError, "index_keys"),
    (dict(index_keys=torch.randn(3, 1, DI)), ValueError, "index_keys"),
    (dict(k_cache=torch.zeros(8, PAGE, G, D, dtype=torch.int8)), TypeError, "k_cache"),
    (dict(v_cache=torch.zeros(8, PAGE, G, D, dtype=torch.float16)), TypeError, "v_cache"),
    (dict(v_cache=torch.zeros(9, PAGE, G, D)), ValueError, "v_cache"),
    (dict(k_cache=torch.zeros(8, PAGE, G, D)[:, :, None]), ValueError, "k_cache"),
    (dict(index_cache=torch.zeros(8, PAGE, DI, dtype=FP8)), ValueError, "index_scale"),
    (dict(index_cache=torch.zeros(8, PAGE, DI, dtype=FP8), index_scale=torch.zeros(8, PAGE + 1)),
     ValueError, "index_scale"),
    (dict(index_cache=torch.zeros(8, PAGE, DI, dtype=FP8),
          index_scale=torch.zeros(8, PAGE, dtype=torch.float16)), TypeError, "index_scale"),
    (dict(index_scale=torch.zeros(8, PAGE)), ValueError, "index_scale"),
    (dict(block_table=torch.tensor([[0, 1], [2, -1]])), TypeError, "block_table"),
    (dict(block_table=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "block_table"),
    (dict(seq_lens=torch.tensor([6, 3, 1], dtype=torch.int32)), ValueError, "seq_lens"),
    (dict(seq_lens=torch.tensor([6., 3.])), TypeError, "seq_lens"),
    (dict(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=None), TypeError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 3])), TypeError, "cu_seqlens_q"),
    # Value checks (check_values=True).
    (dict(check_values=True, cu_seqlens_q=torch.tensor([0, 2, 2], dtype=torch.int32)),
     ValueError, "cu_seqlens_q"),
    (dict(check_values=True, seq_lens=torch.tensor([1, 3], dtype=torch.int32)), ValueError,
     "seq_lens"),
    (dict(check_values=True, seq_lens=torch.tensor([6, 5], dtype=torch.int32)), ValueError,
     "block_table"),
    (dict(check_values=True, seq_lens=torch.tensor([9, 3], dtype=torch.int32)), ValueError,
     "block_table"),
    (dict(check_values=True, block_table=torch.tensor([[0, 8], [2, -1]], dtype=torch.int32)),
     ValueError, "block_table"),
])
def test_write_rejects(overrides, error, name):
    with pytest.raises(error, match=rf"\b{name}\b"):
        _write(**overrides)


def test_gather_rejects():
    cache = torch.zeros(4, PAGE, DI)
    table = torch.tensor([[0, 1], [3, -1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_table"):
        gather_paged(cache, table, torch.tensor([8, 5], dtype=torch.int32))  # needs page -1
    with pytest.raises(ValueError, match="block_table"):
        gather_paged(cache, table, torch.tensor([9, 1], dtype=torch.int32))  # needs 3 pages
    with pytest.raises(ValueError, match="seq_lens"):
        gather_paged(cache, table, torch.tensor([8], dtype=torch.int32))
    with pytest.raises(TypeError, match="cache"):
        gather_paged(torch.zeros(4), table, torch.tensor([1, 1], dtype=torch.int32))
    out, cu = gather_paged(cache, table, torch.tensor([0, 0], dtype=torch.int32))
    assert out.shape == (0, DI) and cu.tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------------------------
# MSAPagedCache
# ----------------------------------------------------------------------------------------------

def test_allocator():
    c = MSAPagedCache(10, PAGE, G, D, DI, dtype=torch.float32)
    assert c.num_free_pages == 10 and c.pages_needed(0) == 0 and c.pages_needed(5) == 2
    a = c.allocate(9)  # 3 pages
    b = c.allocate(4)  # 1 page
    assert len(a) == 3 and len(b) == 1 and not set(a) & set(b)
    assert c.num_free_pages == 6 and c.allocate(0) == []
    with pytest.raises(RuntimeError, match="out of cache pages"):
        c.allocate(7 * PAGE)
    assert c.num_free_pages == 6  # a failed allocation takes nothing
    c.free(a)
    assert c.num_free_pages == 9
    with pytest.raises(ValueError, match="pages"):
        c.free(a)  # double free
    with pytest.raises(ValueError, match="pages"):
        c.free([b[0], b[0]])
    with pytest.raises(ValueError, match="num_tokens"):
        c.allocate(-1)
    with pytest.raises(TypeError, match="num_tokens"):
        c.allocate(1.5)
    everything = c.allocate(9 * PAGE)
    assert sorted(everything + b) == list(range(10)) and c.num_free_pages == 0


def test_build_block_table():
    table = build_block_table([[3, 1], [], [4, 0, 2]])
    assert table.dtype == torch.int32
    assert table.tolist() == [[3, 1, -1], [-1, -1, -1], [4, 0, 2]]
    assert build_block_table([[1]], max_pages=4).tolist() == [[1, -1, -1, -1]]
    with pytest.raises(ValueError, match="max_pages"):
        build_block_table([[1, 2, 3]], max_pages=2)
    c = MSAPagedCache(4, PAGE, G, D, DI)
    assert torch.equal(c.block_table([[2], [0, 1]], max_pages=3),
                       torch.tensor([[2, -1, -1], [0, 1, -1]], dtype=torch.int32))


@pytest.mark.parametrize("index_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("head_major", [False, True])
def test_paged_cache_object(index_dtype, head_major):
    c = MSAPagedCache(12, PAGE, G, D, DI, num_layers=2, dtype=torch.float32,
                      index_dtype=index_dtype, head_major=head_major)
    assert len(c.k_cache) == len(c.v_cache) == len(c.index_cache) == len(c.index_scale) == 2
    assert c.k_cache[0].shape == (12, PAGE, G, D) and c.index_cache[1].shape == (12, PAGE, DI)
    assert c.k_cache[0].is_contiguous() != head_major
    assert c.index_cache[0].dtype == index_dtype
    if index_dtype == FP8:
        assert c.index_scale[0].shape == (12, PAGE) and c.index_scale[0].dtype == torch.float32
    else:
        assert c.index_scale[0] is None and c.index_scale[1] is None
    assert set(c.layer(1)) == {"k_cache", "v_cache", "index_cache", "index_scale",
                               "index_block_scale", "k_scale", "v_scale"}
    assert c.layer(1)["index_block_scale"] is None
    assert c.layer(1)["k_scale"] is None and c.layer(1)["v_scale"] is None

    lens = [6, 3]
    pages = [c.allocate(n + 16) for n in lens]  # room for decode
    table = c.block_table(pages, max_pages=8)
    cu = torch.tensor([0, 6, 9], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    data = {layer: (torch.randn(9, G, D), torch.randn(9, G, D), torch.randn(9, DI))
            for layer in range(2)}
    for layer, (k, v, ki) in data.items():
        c.append(layer, k, v, ki, table, cu, seq_lens, check_values=True)
    # One decode token each.
    seq_lens2 = seq_lens + 1
    cu2 = torch.tensor([0, 1, 2], dtype=torch.int32)
    step = {layer: (torch.randn(2, G, D), torch.randn(2, G, D), torch.randn(2, DI))
            for layer in range(2)}
    for layer, (k, v, ki) in step.items():
        c.append(layer, k, v, ki, table, cu2, seq_lens2)
    for layer in range(2):
        k_all = torch.cat([data[layer][0][:6], step[layer][0][:1], data[layer][0][6:],
                           step[layer][0][1:]])
        got, _ = gather_paged(c.k_cache[layer], table, seq_lens2)
        assert torch.equal(got, k_all)
        ki_all = torch.cat([data[layer][2][:6], step[layer][2][:1], data[layer][2][6:],
                            step[layer][2][1:]])
        got_ki, _ = gather_paged(c.index_cache[layer], table, seq_lens2)
        if index_dtype == FP8:
            scale, _ = gather_paged(c.index_scale[layer], table, seq_lens2)
            got_ki = dequantize_index_keys(got_ki, scale)
            assert ((got_ki - ki_all).abs() <= 2 ** -4 * ki_all.abs() + 1e-6).all()
        else:
            torch.testing.assert_close(got_ki, ki_all.to(torch.bfloat16).float(), check_dtype=False)
    with pytest.raises(ValueError, match="layer"):
        c.append(2, *step[0], table, cu2, seq_lens2)


def test_paged_cache_4bit_index_keys():
    """index_dtype=torch.uint8: writes quantise each token's index key to 4 bits (the cache then
    holds exactly quantize_nvfp4's codes and scales), layer() hands the block scales to the
    paged calls, and a write without them, or with a key width the format cannot hold, fails."""
    index_dim = 32
    c = MSAPagedCache(20, PAGE, G, D, index_dim, num_layers=1, dtype=torch.float32,
                      index_dtype=torch.uint8)
    assert c.index_cache[0].shape == (20, PAGE, index_dim // 2)
    assert c.index_block_scale[0].shape == (20, PAGE, index_dim // 16)
    assert c.index_scale[0].shape == (20, PAGE)
    pages = [c.allocate(n) for n in (40, 23)]  # 10 and 6 blocks: top-3 is sparse
    table = c.block_table(pages)
    cu = torch.tensor([0, 40, 63], dtype=torch.int32)
    seq_lens = torch.tensor([40, 23], dtype=torch.int32)
    k, v, ki = torch.randn(63, G, D), torch.randn(63, G, D), torch.randn(63, index_dim)
    c.append(0, k, v, ki, table, cu, seq_lens, check_values=True)
    layer = c.layer(0)
    packed, block_scale, token_scale = quantize_nvfp4(ki)
    for name, expected in (("index_cache", packed), ("index_block_scale", block_scale),
                           ("index_scale", token_scale)):
        got, _ = gather_paged(layer[name], table, seq_lens)
        assert torch.equal(got.view(torch.uint8) if got.dtype == FP8 else got,
                           expected.view(torch.uint8) if expected.dtype == FP8 else expected), name
    qi = torch.randn(2, G, index_dim)  # each request's last token (4-bit keys: decode only)
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    indices = msattn.msa_paged_select(qi, layer["index_cache"], table, cu_q, seq_lens, topk=3,
                                      index_scale=layer["index_scale"],
                                      index_block_scale=layer["index_block_scale"],
                                      backend="reference")
    expected = msattn.msa_select(qi, dequantize_nvfp4(packed, block_scale, token_scale),
                                 block_size=PAGE, topk=3, cu_seqlens_q=cu_q, cu_seqlens_k=cu,
                                 backend="reference")
    assert torch.equal(indices, expected)
    with pytest.raises(ValueError, match="index_block_scale"):
        write_paged_cache(k, v, ki, c.k_cache[0], c.v_cache[0], c.index_cache[0], table, cu,
                          seq_lens, index_scale=c.index_scale[0])
    with pytest.raises(ValueError, match="index_cache must have shape"):
        write_paged_cache(k, v, ki[:, :16], c.k_cache[0], c.v_cache[0], c.index_cache[0], table,
                          cu, seq_lens, index_scale=c.index_scale[0],
                          index_block_scale=c.index_block_scale[0])


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(num_pages=0), ValueError, "num_pages"),
    (dict(page_size=6), ValueError, "page_size"),
    (dict(head_dim=2.0), TypeError, "head_dim"),
    (dict(num_layers=True), TypeError, "num_layers"),
    (dict(dtype=torch.int8), TypeError, "dtype"),
    (dict(index_dtype=torch.float8_e5m2), TypeError, "index_dtype"),
    (dict(index_dtype=torch.uint8, index_dim=24), ValueError, "4-bit"),
])
def test_paged_cache_rejects(kwargs, error, name):
    args = dict(num_pages=4, page_size=PAGE, num_kv_heads=G, head_dim=D, index_dim=DI)
    args.update(kwargs)
    with pytest.raises(error, match=name):
        MSAPagedCache(args.pop("num_pages"), args.pop("page_size"), args.pop("num_kv_heads"),
                      args.pop("head_dim"), args.pop("index_dim"), **args)


# ----------------------------------------------------------------------------------------------
# GPU: CUDA-graph capture of the write
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("index_dtype", [torch.bfloat16, FP8])
def test_write_in_cuda_graph(index_dtype):
    device = torch.device("cuda")
    c = MSAPagedCache(16, PAGE, G, D, DI, dtype=torch.bfloat16, index_dtype=index_dtype,
                      device=device, head_major=True)
    pages = [c.allocate(12), c.allocate(12)]
    table = c.block_table(pages, max_pages=4, device=device)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([1, 1], dtype=torch.int32, device=device)
    k = torch.zeros(2, G, D, dtype=torch.bfloat16, device=device)
    v, ki = torch.zeros_like(k), torch.zeros(2, DI, dtype=torch.bfloat16, device=device)
    c.append(0, k, v, ki, table, cu, seq_lens)  # warm-up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            c.append(0, k, v, ki, table, cu, seq_lens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    truth = [[], []]
    for step in range(10):
        for t in (k, v, ki):
            t.copy_(torch.randn_like(t) + 1)
        seq_lens.fill_(step + 1)
        graph.replay()
        for b in range(2):
            truth[b].append(k[b].clone())
    torch.cuda.synchronize()
    got, _ = gather_paged(c.k_cache[0], table, seq_lens)
    assert torch.equal(got, torch.cat([torch.stack(truth[0]), torch.stack(truth[1])]))
