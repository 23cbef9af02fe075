"""torch.library custom ops of msattn.library: each op equals its public function, passes
torch.library.opcheck, and traces under torch.compile(fullgraph=True) with eager results and
gradients.

The reference backend runs on tiny shapes (block size 4, head dims 8 and 4: below Triton's tiles);
the Triton backend (CPU interpreter without a GPU) on the smallest shapes it takes (16).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import msattn
import msattn.library as lib
from msattn import dispatch
from msattn.cache import quantize_index_keys, quantize_kv
from tests.kernel_cases import DEVICE, cu_seqlens, paginate

# lens_q, lens_k, heads, groups, head_dim, index_dim, block_size, topk
SHAPES = {
    # A sequence with no queries and one with T < S, several blocks beyond topk.
    "reference": ([5, 9, 0], [12, 9, 3], 4, 2, 8, 4, 4, 2),
    # The interpreter is slow: few tokens, one group, the smallest tiles Triton takes.
    "triton": ([6, 3], [20, 3], 2, 1, 16, 16, 16, 2),
}


def _triton_available():
    return dispatch.TRITON.available(torch.device(DEVICE))


BACKENDS = ["reference",
            pytest.param("triton", marks=pytest.mark.skipif(not _triton_available(),
                                                            reason="needs CUDA or TRITON_INTERPRET=1"))]


def _inputs(backend, seed=0):
    lens_q, lens_k, heads, groups, head_dim, index_dim, block_size, topk = SHAPES[backend]
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE)

    total_q, total_k = sum(lens_q), sum(lens_k)
    return dict(q=randn(total_q, heads, head_dim), k=randn(total_k, groups, head_dim),
                v=randn(total_k, groups, head_dim), qi=randn(total_q, groups, index_dim),
                ki=randn(total_k, index_dim), cu_q=cu_seqlens(lens_q), cu_k=cu_seqlens(lens_k),
                max_q=max(lens_q), max_k=max(lens_k), block_size=block_size, topk=topk,
                scale=head_dim ** -0.5, backend=backend)


def _select(c):
    return lib.select(c["qi"], c["ki"], c["cu_q"], c["cu_k"], max_seqlen_q=c["max_q"],
                      max_seqlen_k=c["max_k"], block_size=c["block_size"], topk=c["topk"],
                      backend=c["backend"])


def _leaves(c):
    return [c[name].detach().clone().requires_grad_() for name in ("q", "k", "v")]


def _weights(o, lse, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(o.shape, generator=generator).to(o.device),
            torch.randn(lse.shape, generator=generator).to(lse.device))


def _loss(o, lse, w_o, w_lse, use):
    loss = 0.0
    if "o" in use:
        loss = loss + (o * w_o).sum()
    if "lse" in use:
        loss = loss + (lse * w_lse).sum()
    return loss


# ----------------------------------------------------------------------------------------------
# Each op equals its public function
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_select_and_sparse_attention_match_public(backend):
    c = _inputs(backend)
    indices = _select(c)
    expected = msattn.msa_select(c["qi"], c["ki"], cu_seqlens_q=c["cu_q"], cu_seqlens_k=c["cu_k"],
                                 block_size=c["block_size"], topk=c["topk"], backend=backend)
    assert indices.dtype == torch.int32 and torch.equal(indices, expected)

    # Gradients: the op's registered backward (custom op msattn::sparse_attention_backward)
    # against the public function's autograd, through o and lse, o only, lse only.
    uses = [("o", "lse"), ("o",), ("lse",)] if backend == "reference" else [("o", "lse")]
    for use in uses:
        mine, theirs = _leaves(c), _leaves(c)
        o, lse = lib.sparse_attention(*mine, indices, c["cu_q"], c["cu_k"], max_seqlen_q=c["max_q"],
                                      max_seqlen_k=c["max_k"], block_size=c["block_size"],
                                      backend=backend)
        o_ref, lse_ref = msattn.msa_sparse_attention(
            *theirs, indices, cu_seqlens_q=c["cu_q"], cu_seqlens_k=c["cu_k"],
            block_size=c["block_size"], backend=backend)
        assert o.dtype == o_ref.dtype and lse.dtype == torch.float32
        torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)
        w_o, w_lse = _weights(o, lse)
        grads = torch.autograd.grad(_loss(o, lse, w_o, w_lse, use), mine)
        # (lse does not depend on v: the public function's autograd gives None, the op zeros.)
        expected_grads = torch.autograd.grad(_loss(o_ref, lse_ref, w_o, w_lse, use), theirs,
                                             allow_unused=True)
        for got, want, leaf in zip(grads, expected_grads, theirs):
            want = torch.zeros_like(leaf) if want is None else want
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _paged_inputs(backend, *, lens_q, fp8=False, seed=0):
    """Paged caches (random page order, NaN in unused slots) of the shapes of ``backend``."""
    _, _, heads, groups, head_dim, index_dim, page_size, topk = SHAPES[backend]
    lens_k = [3 * page_size + 1, page_size - 1, 2 * page_size][:len(lens_q)]
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE)

    cu_k = cu_seqlens(lens_k)
    k, v, ki = (randn(sum(lens_k), groups, head_dim), randn(sum(lens_k), groups, head_dim),
                randn(sum(lens_k), index_dim))

    def pages(x, fill=float("nan")):
        return paginate(x, cu_k, page_size, generator=torch.Generator().manual_seed(seed + 7),
                        fill=fill)

    k_cache, table = pages(k)
    v_cache, _ = pages(v)
    index_scale = None
    if fp8:
        keys, scale = quantize_index_keys(ki)
        index_cache, _ = pages(keys, fill=0.0)
        index_scale, _ = pages(scale)
    else:
        index_cache, _ = pages(ki)
    return dict(q=randn(sum(lens_q), heads, head_dim), qi=randn(sum(lens_q), groups, index_dim),
                k_cache=k_cache, v_cache=v_cache, index_cache=index_cache,
                index_scale=index_scale, block_table=table, cu_q=cu_seqlens(lens_q),
                seq_lens=torch.tensor(lens_k, dtype=torch.int32, device=DEVICE),
                max_q=max(lens_q), topk=topk, scale=head_dim ** -0.5, backend=backend)


PAGED_CASES = [
    ("reference", [1, 2, 5], False),
    ("reference", [3, 1, 4], True),  # fp8 index keys with their scales (Tensor? index_scale)
    pytest.param("triton", [1, 2], False, marks=BACKENDS[1].marks),  # decode kernel
]


@pytest.mark.parametrize("backend, lens_q, fp8", PAGED_CASES)
def test_paged_ops_match_public(backend, lens_q, fp8):
    c = _paged_inputs(backend, lens_q=lens_q, fp8=fp8)
    layout = (c["block_table"], c["cu_q"], c["seq_lens"])
    options = dict(topk=c["topk"], index_scale=c["index_scale"], backend=backend)
    indices = lib.paged_select(c["qi"], c["index_cache"], *layout, max_seqlen_q=c["max_q"],
                               **options)
    expected = msattn.msa_paged_select(c["qi"], c["index_cache"], *layout, **options)
    assert indices.dtype == torch.int32 and torch.equal(indices, expected)
    caches = (c["k_cache"], c["v_cache"], c["index_cache"])
    o, lse = lib.paged_attention(c["q"], c["qi"], *caches, *layout, max_seqlen_q=c["max_q"],
                                 **options)
    o_ref, lse_ref = msattn.msa_paged_attention(c["q"], c["qi"], *caches, *layout,
                                                return_lse=True, **options)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# opcheck: schema, fake impl, autograd registration, AOT dispatch with dynamic shapes
# ----------------------------------------------------------------------------------------------

def _attention_args(c, indices, leaves):
    return (*leaves, indices, c["cu_q"], c["cu_k"], c["block_size"], c["scale"], c["max_q"],
            c["max_k"], False, c["backend"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_varlen_ops(backend):
    c = _inputs(backend)
    select_args = (c["qi"], c["ki"], c["cu_q"], c["cu_k"], c["block_size"], c["topk"], 0, 1,
                   c["max_q"], c["max_k"], backend)
    indices = torch.ops.msattn.select(*select_args)
    leaves = _leaves(c)
    with torch.no_grad():
        o, lse = torch.ops.msattn.sparse_attention(*_attention_args(c, indices, leaves))
    do, dlse = _weights(o, lse)
    backward_args = (do, dlse, c["q"], c["k"], c["v"], o, lse, indices, c["cu_q"], c["cu_k"],
                     c["block_size"], c["scale"], False, backend)
    if backend == "reference":
        torch.library.opcheck(torch.ops.msattn.select.default, select_args)
        # test_aot_dispatch_dynamic runs the op's forward and its registered backward (the
        # backward custom op) under AOTAutograd and compares them with eager.
        torch.library.opcheck(torch.ops.msattn.sparse_attention.default,
                              _attention_args(c, indices, leaves))
        torch.library.opcheck(torch.ops.msattn.sparse_attention_backward.default, backward_args)
        torch.library.opcheck(torch.ops.msattn.sparse_attention_backward.default,
                              (None, dlse, *backward_args[2:]))
    else:
        # Under the interpreter every call of an op costs about a second, and the reference run
        # above already checks the schemas and autograd wiring of the same Python code: check
        # the fake impls against the Triton outputs, and AOT dispatch of the differentiable op.
        fake = ("test_schema", "test_faketensor")
        torch.library.opcheck(torch.ops.msattn.select.default, select_args, test_utils=fake)
        torch.library.opcheck(torch.ops.msattn.sparse_attention.default,
                              _attention_args(c, indices, leaves),
                              test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
        torch.library.opcheck(torch.ops.msattn.sparse_attention_backward.default, backward_args,
                              test_utils=fake)


@pytest.mark.parametrize("backend, lens_q, fp8", PAGED_CASES[:2])
def test_opcheck_paged_ops(backend, lens_q, fp8):
    c = _paged_inputs(backend, lens_q=lens_q, fp8=fp8)
    layout = (c["block_table"], c["cu_q"], c["seq_lens"])
    selection = (c["topk"], 0, 1)
    utils = dict(test_utils=_ALL_BUT_SCHEMA) if fp8 else {}
    torch.library.opcheck(torch.ops.msattn.paged_select.default,
                          (c["qi"], c["index_cache"], *layout, *selection, c["index_scale"],
                           c["max_q"], backend), **utils)
    torch.library.opcheck(torch.ops.msattn.paged_attention.default,
                          (c["q"], c["qi"], c["k_cache"], c["v_cache"], c["index_cache"], *layout,
                           *selection, c["scale"], c["index_scale"], c["max_q"], backend), **utils)


# test_schema compares every input before and after the call to detect mutation, which needs
# arithmetic that CPU torch lacks for float8_e4m3fn; the fp16/fp32 case checks the same schemas.
_ALL_BUT_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("backend, lens_q, per_head", [
    ("reference", [1, 2, 5], False),
    ("reference", [3, 1, 4], True),
    pytest.param("triton", [1, 2], True, marks=BACKENDS[1].marks),  # decode kernel
])
def test_paged_attention_op_fp8_kv(backend, lens_q, per_head):
    """fp8 K/V caches with their scales (Tensor? k_scale, v_scale): the op equals
    msa_paged_attention, and opcheck's fake impl and AOT dispatch pass."""
    c = _paged_inputs(backend, lens_q=lens_q, fp8=False)
    q = c["q"].bfloat16()
    caches, scales = [], []
    for name in ("k_cache", "v_cache"):  # unused slots stay NaN
        values = c[name].nan_to_num()
        scale = quantize_kv(values)[1] if per_head else values.abs().amax() / 448
        caches.append(quantize_kv(c[name], scale)[0])
        scales.append(scale)
    layout = (c["block_table"], c["cu_q"], c["seq_lens"])
    o, lse = lib.paged_attention(q, c["qi"], *caches, c["index_cache"], *layout,
                                 max_seqlen_q=c["max_q"], topk=c["topk"], k_scale=scales[0],
                                 v_scale=scales[1], backend=backend)
    o_ref, lse_ref = msattn.msa_paged_attention(q, c["qi"], *caches, c["index_cache"], *layout,
                                                topk=c["topk"], k_scale=scales[0],
                                                v_scale=scales[1], return_lse=True,
                                                backend=backend)
    assert o.dtype == torch.bfloat16 and not o.isnan().any()
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.msattn.paged_attention.default,
                          (q, c["qi"], *caches, c["index_cache"], *layout, c["topk"], 0, 1,
                           c["scale"], None, c["max_q"], backend, *scales),
                          test_utils=_ALL_BUT_SCHEMA if backend == "reference"
                          else ("test_faketensor",))


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------

def _model(c, use, wrappers=False):
    block_size, topk, scale = c["block_size"], c["topk"], c["scale"]
    max_q, max_k, backend = c["max_q"], c["max_k"], c["backend"]

    def fn(q, k, v, qi, ki, cu_q, cu_k, w_o, w_lse):
        if wrappers:  # as a model would call them (module docstring of msattn.library)
            indices = lib.select(qi, ki, cu_q, cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                                 block_size=block_size, topk=topk, backend=backend)
            o, lse = lib.sparse_attention(q, k, v, indices, cu_q, cu_k, max_seqlen_q=max_q,
                                          max_seqlen_k=max_k, block_size=block_size,
                                          backend=backend)
        else:
            indices = torch.ops.msattn.select(qi, ki, cu_q, cu_k, block_size, topk, 0, 1, max_q,
                                              max_k, backend)
            o, lse = torch.ops.msattn.sparse_attention(q, k, v, indices, cu_q, cu_k, block_size,
                                                       scale, max_q, max_k, False, backend)
        return _loss(o, lse, w_o, w_lse, use), o, indices

    return fn


# backend, compiler, what the loss uses, the wrappers (else torch.ops), dynamic shapes
COMPILE_CASES = [("reference", "eager", ("o", "lse"), True, False),
                 ("reference", "aot_eager", ("o", "lse"), False, False),
                 ("reference", "aot_eager", ("o",), True, True),
                 pytest.param("triton", "aot_eager", ("o", "lse"), False, False,
                              marks=BACKENDS[1].marks)]


@pytest.mark.parametrize("backend, compiler, use, wrappers, dynamic", COMPILE_CASES)
def test_compile_fullgraph_matches_eager(backend, compiler, use, wrappers, dynamic):
    c = _inputs(backend)
    fn = _model(c, use, wrappers)
    o_shape = c["q"].shape
    w_o, w_lse = _weights(torch.empty(o_shape), torch.empty(o_shape[:2]))
    w_o, w_lse = w_o.to(DEVICE), w_lse.to(DEVICE)
    rest = (c["qi"], c["ki"], c["cu_q"], c["cu_k"], w_o, w_lse)

    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(fn, fullgraph=True, backend=compiler, dynamic=dynamic)
    eager_leaves, compiled_leaves = _leaves(c), _leaves(c)
    loss, o, indices = fn(*eager_leaves, *rest)
    loss_c, o_c, indices_c = compiled(*compiled_leaves, *rest)
    assert torch.equal(indices_c, indices)
    torch.testing.assert_close(o_c, o, rtol=0, atol=0)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(loss, eager_leaves)
    grads_c = torch.autograd.grad(loss_c, compiled_leaves)
    for got, want in zip(grads_c, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # One graph, the ops in it as single nodes (fullgraph=True already raises on a break).
    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=counting, dynamic=dynamic)(*_leaves(c), *rest)
    assert len(graphs) == 1
    targets = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert {torch.ops.msattn.select.default, torch.ops.msattn.sparse_attention.default} <= targets \
        or {torch.ops.msattn.select, torch.ops.msattn.sparse_attention} <= targets


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------

def test_registration_is_idempotent():
    for name in lib.OPS:
        assert hasattr(torch.ops.msattn, name)
    assert lib._register() == {}  # every op already defined: nothing registered again
    again = importlib.reload(lib)
    assert again._CUSTOM_OPS is lib._CUSTOM_OPS
    c = _inputs("reference")
    assert torch.equal(again.select(c["qi"], c["ki"], c["cu_q"], c["cu_k"], max_seqlen_q=c["max_q"],
                                    max_seqlen_k=c["max_k"], block_size=c["block_size"],
                                    topk=c["topk"], backend="reference"), _select(c))
