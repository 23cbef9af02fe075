"""Argument checks of the public API: every bad input is a ValueError / TypeError naming it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import msattn

H, G, D, DI = 4, 2, 8, 4
LENS_Q, LENS_K = [4, 6], [5, 7]
TOTAL_Q, TOTAL_K = sum(LENS_Q), sum(LENS_K)
B, T, S = 2, 5, 6
TOPK = 2


def cu(values):
    return torch.tensor(values, dtype=torch.int32)


def varlen_inputs():
    gen = torch.Generator().manual_seed(0)
    return dict(q=torch.randn(TOTAL_Q, H, D, generator=gen), k=torch.randn(TOTAL_K, G, D, generator=gen),
                v=torch.randn(TOTAL_K, G, D, generator=gen), qi=torch.randn(TOTAL_Q, G, DI, generator=gen),
                ki=torch.randn(TOTAL_K, DI, generator=gen), cu_seqlens_q=cu([0, 4, 10]),
                cu_seqlens_k=cu([0, 5, 12]),
                indices=torch.zeros(G, TOTAL_Q, TOPK, dtype=torch.int32))


def batched_inputs():
    gen = torch.Generator().manual_seed(1)
    return dict(q=torch.randn(B, T, H, D, generator=gen), k=torch.randn(B, S, G, D, generator=gen),
                v=torch.randn(B, S, G, D, generator=gen), qi=torch.randn(B, T, G, DI, generator=gen),
                ki=torch.randn(B, S, DI, generator=gen),
                indices=torch.zeros(B, G, T, TOPK, dtype=torch.int32))


def call(fn_name, args, **kwargs):
    """Call a public function with the tensors of ``args`` (a dict), overridden by ``kwargs``."""
    a = {**args, **kwargs}
    options = {name: a[name] for name in ("cu_seqlens_q", "cu_seqlens_k", "block_size", "topk",
                                           "init_blocks", "local_blocks", "softmax_scale", "backend")
               if name in a}
    options.setdefault("block_size", 4)
    if fn_name == "select":
        options.pop("softmax_scale", None)
        options.setdefault("topk", TOPK)
        return msattn.msa_select(a["qi"], a["ki"], **options)
    if fn_name == "sparse":
        for name in ("topk", "init_blocks", "local_blocks"):
            options.pop(name, None)
        return msattn.msa_sparse_attention(a["q"], a["k"], a["v"], a["indices"], **options)
    options.setdefault("topk", TOPK)
    return msattn.msa_attention(a["q"], a["k"], a["v"], a["qi"], a["ki"], **options)


FNS = ("select", "sparse", "attention")


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("make", [varlen_inputs, batched_inputs])
def test_valid_inputs_are_accepted(fn, make):
    # The base inputs of every negative case below are valid: only the override breaks them.
    out = call(fn, make(), backend="reference")
    assert out is not None
    for backend in ("auto", "reference"):
        call(fn, make(), backend=backend)


def _no_cu(args):
    return {k: v for k, v in args.items() if not k.startswith("cu_")}


# (function names, input maker, overrides, exception, match)
V, BT = varlen_inputs, batched_inputs
CASES = [
    # --- ranks ---------------------------------------------------------------------------------
    (("select",), V, dict(qi=torch.randn(TOTAL_Q, G * DI)), ValueError, r"^qi must have shape"),
    (("select", "attention"), V, dict(ki=torch.randn(TOTAL_K, 1, DI)), ValueError, r"^ki must have shape"),
    (("select", "attention"), BT, dict(ki=torch.randn(B * S, DI)), ValueError, r"^ki must have shape"),
    (("select", "attention"), V, dict(qi=torch.randn(1, TOTAL_Q, G, DI, 1)), ValueError, r"^qi must have shape"),
    (("sparse", "attention"), V, dict(q=torch.randn(TOTAL_Q, H * D)), ValueError, r"^q must have shape"),
    (("sparse", "attention"), V, dict(k=torch.randn(TOTAL_K, G * D)), ValueError, r"^k must have shape"),
    (("sparse", "attention"), V, dict(v=torch.randn(TOTAL_K, G, D, 1)), ValueError, r"^v must have shape"),
    (("sparse", "attention"), BT, dict(k=torch.randn(B * S, G, D)), ValueError, r"^k must have shape"),
    (("sparse", "attention"), BT, dict(v=torch.randn(B * S, G, D)), ValueError, r"^v must have shape"),
    # --- mismatched sizes ----------------------------------------------------------------------
    (("sparse", "attention"), V, dict(q=torch.randn(TOTAL_Q, 5, D)), ValueError, r"H = 5 .*multiple.*G = 2 \(q and k\)"),
    (("sparse", "attention"), BT, dict(q=torch.randn(B, T, 3, D)), ValueError, r"H = 3 .*multiple.*G = 2"),
    (("sparse", "attention"), V, dict(k=torch.randn(TOTAL_K, G, D + 1), v=torch.randn(TOTAL_K, G, D + 1)),
     ValueError, r"^k must have shape"),
    (("sparse", "attention"), BT, dict(k=torch.randn(B + 1, S, G, D), v=torch.randn(B + 1, S, G, D)),
     ValueError, r"^k must have shape .*B=2"),
    (("sparse", "attention"), V, dict(v=torch.randn(TOTAL_K, G, D + 1)), ValueError, r"^v must have the shape of k"),
    (("sparse", "attention"), V, dict(v=torch.randn(TOTAL_K + 1, G, D)), ValueError, r"^v must have the shape of k"),
    (("sparse", "attention"), BT, dict(v=torch.randn(B, S, 1, D)), ValueError, r"^v must have the shape of k"),
    (("select", "attention"), V, dict(ki=torch.randn(TOTAL_K, DI + 1)), ValueError, r"^ki must have shape .*Di=4"),
    (("select", "attention"), BT, dict(ki=torch.randn(B, S, DI + 1)), ValueError, r"^ki must have shape .*Di=4"),
    (("select", "attention"), BT, dict(ki=torch.randn(B + 1, S, DI)), ValueError, r"^ki must have shape .*B=2"),
    (("attention",), V, dict(qi=torch.randn(TOTAL_Q, G + 1, DI)), ValueError, r"^qi must have G = 2"),
    (("attention",), BT, dict(qi=torch.randn(B, T, G + 1, DI)), ValueError, r"^qi must have G = 2"),
    (("attention",), V, dict(qi=torch.randn(TOTAL_Q - 1, G, DI)), ValueError, r"^qi must have one row per query"),
    (("attention",), V, dict(ki=torch.randn(TOTAL_K + 1, DI)), ValueError, r"^ki must have one row per key"),
    (("attention",), BT, dict(qi=torch.randn(B, T - 1, G, DI)), ValueError, r"qi \[B, T, G, Di\] and ki"),
    (("attention",), BT, dict(ki=torch.randn(B, S + 1, DI)), ValueError, r"qi \[B, T, G, Di\] and ki"),
    # Same element counts, different (B, T, S): must not be silently reinterpreted.
    (("attention",), BT, dict(qi=torch.randn(1, B * T, G, DI), ki=torch.randn(1, B * S, DI)), ValueError,
     r"qi \[B, T, G, Di\] and ki"),
    (("attention",), BT, dict(qi=torch.randn(B * T, G, DI), ki=torch.randn(B * S, DI)), ValueError,
     r"q and qi must use the same layout"),
    (("attention",), V, dict(qi=torch.randn(1, TOTAL_Q, G, DI), ki=torch.randn(1, TOTAL_K, DI)), ValueError,
     r"q and qi must use the same layout"),
    # --- dtypes --------------------------------------------------------------------------------
    (("select", "attention"), V, dict(qi=torch.randint(0, 3, (TOTAL_Q, G, DI))), TypeError, r"^qi must have dtype"),
    (("select", "attention"), V, dict(qi=torch.randn(TOTAL_Q, G, DI, dtype=torch.float64)), TypeError,
     r"^qi must have dtype .*float64"),
    (("select", "attention"), BT, dict(ki=torch.randn(B, S, DI, dtype=torch.float64)), TypeError,
     r"^ki must have dtype"),
    (("sparse", "attention"), V, dict(q=torch.randn(TOTAL_Q, H, D, dtype=torch.float64)), TypeError,
     r"^q must have dtype"),
    (("sparse", "attention"), BT, dict(k=torch.ones(B, S, G, D, dtype=torch.int32)), TypeError, r"^k must have dtype"),
    (("sparse", "attention"), V, dict(v=torch.ones(TOTAL_K, G, D, dtype=torch.bool)), TypeError, r"^v must have dtype"),
    (("sparse", "attention"), V, dict(k=torch.randn(TOTAL_K, G, D, dtype=torch.float16)), TypeError,
     r"q, k and v must share one dtype"),
    (("sparse", "attention"), BT, dict(v=torch.randn(B, S, G, D, dtype=torch.bfloat16)), TypeError,
     r"q, k and v must share one dtype"),
    (("sparse",), V, dict(indices=torch.zeros(G, TOTAL_Q, TOPK, dtype=torch.int64)), TypeError,
     r"^indices must have dtype .*int32"),
    (("sparse",), BT, dict(indices=torch.zeros(B, G, T, TOPK)), TypeError, r"^indices must have dtype"),
    # --- indices shape -------------------------------------------------------------------------
    (("sparse",), V, dict(indices=torch.zeros(G, TOTAL_Q + 1, TOPK, dtype=torch.int32)), ValueError,
     r"^indices must have shape"),
    (("sparse",), V, dict(indices=torch.zeros(TOTAL_Q, G, TOPK, dtype=torch.int32)), ValueError,
     r"^indices must have shape"),
    (("sparse",), V, dict(indices=torch.zeros(1, G, TOTAL_Q, TOPK, dtype=torch.int32)), ValueError,
     r"^indices must have shape"),
    (("sparse",), BT, dict(indices=torch.zeros(B, T, G, TOPK, dtype=torch.int32)), ValueError,
     r"^indices must have shape \[B=2, G=2, T=5"),
    (("sparse",), BT, dict(indices=torch.zeros(G, B * T, TOPK, dtype=torch.int32)), ValueError,
     r"^indices must have shape"),
    # --- non-tensor inputs ---------------------------------------------------------------------
    (("select", "attention"), V, dict(qi=np.zeros((TOTAL_Q, G, DI), dtype=np.float32)), TypeError,
     r"^qi must be a torch.Tensor"),
    (("select", "attention"), V, dict(ki=[[0.0] * DI] * TOTAL_K), TypeError, r"^ki must be a torch.Tensor"),
    (("sparse", "attention"), V, dict(q=None), TypeError, r"^q must be a torch.Tensor"),
    (("sparse", "attention"), V, dict(k=np.zeros((TOTAL_K, G, D), dtype=np.float32)), TypeError,
     r"^k must be a torch.Tensor"),
    (("sparse", "attention"), BT, dict(v=1.0), TypeError, r"^v must be a torch.Tensor"),
    (("sparse",), V, dict(indices=[[[0, 1]] * TOTAL_Q] * G), TypeError, r"^indices must be a torch.Tensor"),
    (FNS, V, dict(cu_seqlens_q=[0, 4, 10]), TypeError, r"^cu_seqlens_q must be an int32 torch.Tensor"),
    (FNS, V, dict(cu_seqlens_k=(0, 5, 12)), TypeError, r"^cu_seqlens_k must be an int32 torch.Tensor"),
    # --- cu_seqlens ----------------------------------------------------------------------------
    (FNS, V, dict(cu_seqlens_q=torch.tensor([0, 4, 10])), TypeError, r"^cu_seqlens_q must have dtype int32"),
    (FNS, V, dict(cu_seqlens_k=torch.tensor([0.0, 5.0, 12.0])), TypeError, r"^cu_seqlens_k must have dtype int32"),
    (FNS, V, dict(cu_seqlens_q=cu([1, 4, 10])), ValueError, r"^cu_seqlens_q must start at 0"),
    (FNS, V, dict(cu_seqlens_k=cu([2, 5, 12])), ValueError, r"^cu_seqlens_k must start at 0"),
    (FNS, V, dict(cu_seqlens_q=cu([0, 4, 3, 10]), cu_seqlens_k=cu([0, 5, 5, 12])), ValueError,
     r"^cu_seqlens_q must be non-decreasing"),
    (FNS, V, dict(cu_seqlens_k=cu([0, 7, 5, 12])), ValueError, r"^cu_seqlens_k must be non-decreasing"),
    (FNS, V, dict(cu_seqlens_q=cu([0, 4, 9])), ValueError, r"^cu_seqlens_q\[-1\] must equal total_q = 10"),
    (FNS, V, dict(cu_seqlens_k=cu([0, 5, 13])), ValueError, r"^cu_seqlens_k\[-1\] must equal total_k = 12"),
    (FNS, V, dict(cu_seqlens_k=cu([0, 5, 6, 12])), ValueError, r"^cu_seqlens_q and cu_seqlens_k must have the same length"),
    (FNS, V, dict(cu_seqlens_q=cu([[0, 4, 10]]), cu_seqlens_k=cu([[0, 5, 12]])), ValueError,
     r"^cu_seqlens_q must have shape \[B \+ 1\]"),
    (FNS, V, dict(cu_seqlens_q=cu([10]), cu_seqlens_k=cu([12])), ValueError, r"^cu_seqlens_q must have shape \[B \+ 1\]"),
    (FNS, V, dict(cu_seqlens_q=cu([0, 6, 10])), ValueError, r"sequence 0 has len_q = 6 > len_k = 5.*cu_seqlens_q"),
    (FNS, BT, dict(cu_seqlens_q=cu([0, 5, 10]), cu_seqlens_k=cu([0, 6, 12])), ValueError,
     r"^cu_seqlens_q / cu_seqlens_k must be None for batched"),
    (FNS, BT, dict(cu_seqlens_k=cu([0, 6, 12])), ValueError, r"^cu_seqlens_q / cu_seqlens_k must be None for batched"),
    (FNS, lambda: _no_cu(V()), dict(cu_seqlens_q=cu([0, 4, 10])), ValueError,
     r"^cu_seqlens_q and cu_seqlens_k must be given together"),
    (FNS, lambda: _no_cu(V()), dict(cu_seqlens_k=cu([0, 5, 12])), ValueError,
     r"^cu_seqlens_q and cu_seqlens_k must be given together"),
    # --- T > S ---------------------------------------------------------------------------------
    (("select",), BT, dict(qi=torch.randn(B, S + 1, G, DI)), ValueError, r"^qi has T = 7 .* ki has S = 6"),
    (("sparse", "attention"), BT, dict(q=torch.randn(B, S + 1, H, D), qi=torch.randn(B, S + 1, G, DI),
                                       indices=torch.zeros(B, G, S + 1, TOPK, dtype=torch.int32)),
     ValueError, r"^q has T = 7 .* k has S = 6"),
    (("select",), lambda: _no_cu(V()), dict(ki=torch.randn(TOTAL_Q - 1, DI)), ValueError,
     r"len_q = 10 > len_k = 9"),
    # --- selection parameters ------------------------------------------------------------------
    (("select", "attention"), V, dict(topk=1, init_blocks=1, local_blocks=1), ValueError,
     r"^topk must be >= init_blocks \+ local_blocks = 2"),
    (("select", "attention"), BT, dict(topk=3, init_blocks=0, local_blocks=4), ValueError,
     r"^topk must be >= init_blocks \+ local_blocks = 4"),
    (("select", "attention"), V, dict(local_blocks=0), ValueError, r"^local_blocks must be >= 1"),
    (("select", "attention"), V, dict(init_blocks=-1), ValueError, r"^init_blocks must be >= 0"),
    (("select", "attention"), V, dict(topk=0), ValueError, r"^topk must be >= 1"),
    (("select", "attention"), V, dict(topk=2.0), TypeError, r"^topk must be an int"),
    (("select", "attention"), V, dict(local_blocks=True), TypeError, r"^local_blocks must be an int"),
    (FNS, V, dict(block_size=96), ValueError, r"^block_size must be a power of two"),
    (FNS, BT, dict(block_size=12), ValueError, r"^block_size must be a power of two"),
    (FNS, V, dict(block_size=0), ValueError, r"^block_size must be >= 1"),
    (FNS, V, dict(block_size=-8), ValueError, r"^block_size must be >= 1"),
    (FNS, V, dict(block_size=16.0), TypeError, r"^block_size must be an int"),
    (("sparse", "attention"), V, dict(softmax_scale="0.1"), TypeError, r"^softmax_scale must be a float"),
    (("sparse", "attention"), BT, dict(softmax_scale=torch.tensor(0.1)), TypeError, r"^softmax_scale must be a float"),
    # --- backend -------------------------------------------------------------------------------
    (FNS, V, dict(backend="cuda"), ValueError, r"^backend must be one of"),
    (FNS, BT, dict(backend=None), ValueError, r"^backend must be one of"),
    (FNS, V, dict(backend="Reference"), ValueError, r"^backend must be one of"),
]


def _case_id(case):
    fns, make, overrides, exc, _ = case
    return f"{make.__name__ if hasattr(make, '__name__') else 'inputs'}-{'+'.join(overrides)}-{exc.__name__}"


@pytest.mark.parametrize("fns,make,overrides,exc,match",
                         [pytest.param(*c, id=f"{i}-{_case_id(c)}") for i, c in enumerate(CASES)])
def test_bad_input_raises_naming_the_argument(fns, make, overrides, exc, match):
    for fn in fns:
        with pytest.raises(exc, match=match):
            call(fn, make(), **{"backend": "reference", **overrides})


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for fn in FNS:
        for make in (varlen_inputs, batched_inputs):
            with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
                call(fn, make(), backend="triton")
    # auto still works on CPU without the interpreter (it picks the reference).
    call("attention", varlen_inputs(), backend="auto")


# Mixed devices: a CUDA-less machine has one real device, so a 'meta' tensor stands in for the
# second one (it has shapes and dtypes but no data, which the checks reach before any compute).
MIXED_DEVICE_CASES = [
    (("select", "attention"), V, "ki", lambda x: x["ki"].to("meta")),
    (("select", "attention"), BT, "ki", lambda x: x["ki"].to("meta")),
    (("sparse", "attention"), V, "k", lambda x: x["k"].to("meta")),
    (("sparse", "attention"), BT, "v", lambda x: x["v"].to("meta")),
    (FNS, V, "cu_seqlens_k", lambda x: x["cu_seqlens_k"].to("meta")),
    (("sparse",), V, "indices", lambda x: x["indices"].to("meta")),
    (("sparse",), BT, "indices", lambda x: x["indices"].to("meta")),
]


@pytest.mark.parametrize("fns,make,name,convert", MIXED_DEVICE_CASES)
def test_mixed_devices_raise_naming_the_tensor(fns, make, name, convert):
    for fn in fns:
        x = make()
        with pytest.raises(ValueError, match=rf"^{name} is on meta but \w+ is on cpu"):
            call(fn, x, backend="reference", **{name: convert(x)})


def test_mixed_devices_between_main_and_index_inputs():
    x = batched_inputs()
    with pytest.raises(ValueError, match=r"^qi is on meta but q is on cpu"):
        msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"].to("meta"), x["ki"].to("meta"), block_size=4,
                             topk=TOPK, backend="reference")
    y = varlen_inputs()
    with pytest.raises(ValueError, match=r"qi is on meta"):
        msattn.msa_attention(y["q"], y["k"], y["v"], y["qi"].to("meta"), y["ki"].to("meta"), block_size=4,
                             topk=TOPK, cu_seqlens_q=y["cu_seqlens_q"], cu_seqlens_k=y["cu_seqlens_k"],
                             backend="reference")


# ----------------------------------------------------------------------------------------------
# Shapes, dtypes and degenerate-but-valid inputs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_shapes_and_dtypes(dtype):
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in varlen_inputs().items()}
    idx = msattn.msa_select(x["qi"], x["ki"], block_size=4, topk=3, cu_seqlens_q=x["cu_seqlens_q"],
                            cu_seqlens_k=x["cu_seqlens_k"], backend="reference")
    assert idx.shape == (G, TOTAL_Q, 3) and idx.dtype == torch.int32
    o, lse = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], idx, block_size=4,
                                         cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"],
                                         backend="reference")
    assert o.shape == (TOTAL_Q, H, D) and o.dtype == dtype
    assert lse.shape == (TOTAL_Q, H) and lse.dtype == torch.float32
    o2 = msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], block_size=4, topk=3,
                              cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"],
                              backend="reference")
    assert isinstance(o2, torch.Tensor) and o2.dtype == dtype and torch.equal(o2, o)

    y = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batched_inputs().items()}
    idx = msattn.msa_select(y["qi"], y["ki"], block_size=2, topk=3, backend="reference")
    assert idx.shape == (B, G, T, 3) and idx.dtype == torch.int32
    o, lse = msattn.msa_attention(y["q"], y["k"], y["v"], y["qi"], y["ki"], block_size=2, topk=3,
                                  return_lse=True, backend="reference")
    assert o.shape == (B, T, H, D) and o.dtype == dtype
    assert lse.shape == (B, T, H) and lse.dtype == torch.float32


def test_default_softmax_scale_is_inverse_sqrt_head_dim():
    x = varlen_inputs()
    cus = dict(cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"])
    idx = msattn.msa_select(x["qi"], x["ki"], block_size=4, topk=TOPK, **cus, backend="reference")
    o_default, lse_default = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], idx, block_size=4, **cus,
                                                         backend="reference")
    o_explicit, lse_explicit = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], idx, block_size=4,
                                                           softmax_scale=D ** -0.5, **cus, backend="reference")
    o_other, _ = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], idx, block_size=4, softmax_scale=1.0,
                                             **cus, backend="reference")
    assert torch.equal(o_default, o_explicit) and torch.equal(lse_default, lse_explicit)
    assert not torch.allclose(o_default, o_other)
    # Integer scales are accepted too.
    o_int, _ = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], idx, block_size=4, softmax_scale=1,
                                           **cus, backend="reference")
    assert torch.equal(o_int, o_other)


def test_varlen_without_cu_seqlens_is_one_sequence():
    x = varlen_inputs()
    q, k, v, qi, ki = x["q"], x["k"][:TOTAL_Q], x["v"][:TOTAL_Q], x["qi"], x["ki"][:TOTAL_Q]
    o = msattn.msa_attention(q, k, v, qi, ki, block_size=4, topk=TOPK, backend="reference")
    o_cu = msattn.msa_attention(q, k, v, qi, ki, block_size=4, topk=TOPK, cu_seqlens_q=cu([0, TOTAL_Q]),
                                cu_seqlens_k=cu([0, TOTAL_Q]), backend="reference")
    assert torch.equal(o, o_cu)


def test_empty_inputs():
    # Zero query tokens (batched T = 0, or an empty varlen batch) give empty outputs, not errors.
    x = batched_inputs()
    idx = msattn.msa_select(x["qi"][:, :0], x["ki"], block_size=4, topk=TOPK, backend="reference")
    assert idx.shape == (B, G, 0, TOPK)
    o, lse = msattn.msa_attention(x["q"][:, :0], x["k"], x["v"], x["qi"][:, :0], x["ki"], block_size=4,
                                  topk=TOPK, return_lse=True, backend="reference")
    assert o.shape == (B, 0, H, D) and lse.shape == (B, 0, H)
    o, lse = msattn.msa_sparse_attention(x["q"][:, :0], x["k"], x["v"], idx, block_size=4,
                                         backend="reference")
    assert o.shape == (B, 0, H, D) and lse.shape == (B, 0, H)
    y = varlen_inputs()
    o = msattn.msa_attention(y["q"][:0], y["k"][:0], y["v"][:0], y["qi"][:0], y["ki"][:0], block_size=4,
                             topk=TOPK, backend="reference")
    assert o.shape == (0, H, D)
    idx = msattn.msa_select(y["qi"][:0], y["ki"], block_size=4, topk=TOPK, cu_seqlens_q=cu([0, 0, 0]),
                            cu_seqlens_k=cu([0, 5, 12]), backend="reference")
    assert idx.shape == (G, 0, TOPK)


def test_public_exports():
    assert set(msattn.__all__) >= {"MSAConfig", "msa_attention", "msa_select", "msa_sparse_attention"}
    for name in msattn.__all__:
        assert hasattr(msattn, name)


def test_fp8_index_dtype_selects_on_quantised_index_inputs():
    """``index_dtype=torch.float8_e4m3fn``: the selection of the fp8-rounded queries and the
    per-token quantised keys, and msa_attention attends over exactly that selection."""
    from msattn import reference
    from msattn.cache import dequantize_index_keys, quantize_index_keys

    x = varlen_inputs()
    cus = dict(cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"])
    fp8 = dict(block_size=2, topk=3, index_dtype=torch.float8_e4m3fn, backend="reference")
    idx = msattn.msa_select(x["qi"], x["ki"], **cus, **fp8)
    expected = reference.select_blocks(reference.fp8_index_queries(x["qi"]),
                                       dequantize_index_keys(*quantize_index_keys(x["ki"])),
                                       x["cu_seqlens_q"], x["cu_seqlens_k"], block_size=2, topk=3,
                                       init_blocks=0, local_blocks=1)
    assert torch.equal(idx, expected)
    o = msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], **cus, **fp8)
    o_sparse, _ = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], idx, block_size=2, **cus,
                                              backend="reference")
    assert torch.equal(o, o_sparse)
    for fn in (msattn.msa_select, msattn.msa_attention):
        args = (x["qi"], x["ki"]) if fn is msattn.msa_select else (x["q"], x["k"], x["v"], x["qi"], x["ki"])
        with pytest.raises(TypeError, match="index_dtype must be None"):
            fn(*args, **cus, block_size=2, topk=3, index_dtype="fp8", backend="reference")
