"""msattn's ops as ``torch.library`` custom ops, so that ``torch.compile(fullgraph=True)`` traces
models that call MSA.

Importing this module registers, once per process (importing it again, or ``importlib.reload``,
registers nothing new), these ops in the ``msattn`` namespace, each with a fake (meta)
implementation that computes output shapes from input shapes alone (the selection always has
``topk`` columns), and schemas of plain types only::

    msattn::select(Tensor qi, Tensor ki, Tensor cu_seqlens_q, Tensor cu_seqlens_k,
                   SymInt block_size, SymInt topk, SymInt init_blocks, SymInt local_blocks,
                   SymInt max_seqlen_q, SymInt max_seqlen_k, str backend) -> Tensor
        # int32 [G, total_q, topk], as msattn.msa_select (varlen layout)
    msattn::sparse_attention(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor cu_seqlens_q,
                             Tensor cu_seqlens_k, SymInt block_size, float softmax_scale,
                             SymInt max_seqlen_q, SymInt max_seqlen_k, bool deterministic,
                             str backend) -> (Tensor o, Tensor lse)
        # as msattn.msa_sparse_attention; differentiable in q, k, v (and through lse)
    msattn::sparse_attention_backward(Tensor? do, Tensor? dlse, Tensor q, Tensor k, Tensor v,
                                      Tensor o, Tensor lse, Tensor indices, Tensor cu_seqlens_q,
                                      Tensor cu_seqlens_k, SymInt block_size, float softmax_scale,
                                      bool deterministic, str backend) -> (Tensor dq, Tensor dk,
                                                                           Tensor dv)
    msattn::paged_select(Tensor qi, Tensor index_cache, Tensor block_table, Tensor cu_seqlens_q,
                         Tensor seq_lens, SymInt topk, SymInt init_blocks, SymInt local_blocks,
                         Tensor? index_scale, SymInt max_seqlen_q, str backend,
                         Tensor? index_block_scale=None) -> Tensor
        # as msattn.msa_paged_select (4-bit index keys with index_block_scale)
    msattn::paged_attention(Tensor q, Tensor qi, Tensor k_cache, Tensor v_cache,
                            Tensor index_cache, Tensor block_table, Tensor cu_seqlens_q,
                            Tensor seq_lens, SymInt topk, SymInt init_blocks, SymInt local_blocks,
                            float softmax_scale, Tensor? index_scale, SymInt max_seqlen_q,
                            str backend, Tensor? k_scale=None, Tensor? v_scale=None,
                            Tensor? index_block_scale=None) -> (Tensor o, Tensor lse)
        # as msattn.msa_paged_attention(..., return_lse=True); forward only; fp8 K/V caches
        # with float32 k_scale, v_scale [] or [G]

Every op picks its implementation with :mod:`msattn.dispatch` (the ``backend`` string is
``"auto"``, ``"reference"`` or ``"triton"``, as for the public functions) and runs the backend
module's function; the backward runs Triton's
:func:`msattn.ops.sparse_attention_bwd.sparse_attention_backward` on the Triton path, and torch
autograd through the exact reference on the reference path.

The ops do **not** check their arguments: they run on inputs in the varlen layout that are
already valid (shapes, dtypes, devices, ``cu_seqlens`` values, distinct indices). Check a layout
once, outside the compiled region, with the public ``msattn.msa_*`` functions. Those functions
read the ``cu_seqlens`` back to the host (a graph break under torch.compile, and a sync) unless
they are given ``max_seqlen_q``/``max_seqlen_k`` ints; the ops here always take them as ints.

Use from a model under torch.compile, through the wrappers below (or ``torch.ops.msattn.*``
directly)::

    import msattn.library as msa_lib

    class SparseLayer(torch.nn.Module):
        def forward(self, q, k, v, qi, ki, cu_q, cu_k, max_q: int, max_k: int):
            indices = msa_lib.select(qi, ki, cu_q, cu_k, block_size=128, topk=16,
                                     max_seqlen_q=max_q, max_seqlen_k=max_k)
            o, lse = msa_lib.sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=128,
                                              max_seqlen_q=max_q, max_seqlen_k=max_k)
            return o

    layer = torch.compile(SparseLayer(), fullgraph=True)

``max_q``/``max_k`` are Python ints (the longest query and key sequence, as in flash-attn); they
are constants (or size symbols) to the compiler, so nothing in the graph reads a tensor on the
host. Under torch.compile the ops are opaque nodes: Inductor does not fuse into them, and the
Triton kernels inside launch as in eager mode. Unlike :func:`msattn.msa_attention`, nothing here
takes the dense FlashAttention shortcut for short sequences (``backend="auto"`` means the Triton
kernels on CUDA, the reference elsewhere).
"""

from __future__ import annotations

from typing import Optional

import torch

from msattn import dispatch
from msattn.paged import run_paged_attention

NAMESPACE = "msattn"
OPS = ("select", "sparse_attention", "sparse_attention_backward", "paged_select",
       "paged_attention")


# ----------------------------------------------------------------------------------------------
# Implementations (plain functions; registered as ops in _register)
# ----------------------------------------------------------------------------------------------

def _select_impl(qi: torch.Tensor, ki: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, block_size: int, topk: int, init_blocks: int,
                 local_blocks: int, max_seqlen_q: int, max_seqlen_k: int,
                 backend: str) -> torch.Tensor:
    path = dispatch.select_path(backend, qi.device, block_size=block_size, index_dim=qi.shape[-1])
    with torch.no_grad():
        return path.select_impl().select_blocks(
            qi, ki, cu_seqlens_q, cu_seqlens_k, block_size=block_size, topk=topk,
            init_blocks=init_blocks, local_blocks=local_blocks, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k)


def _select_fake(qi, ki, cu_seqlens_q, cu_seqlens_k, block_size, topk, init_blocks,
                 local_blocks, max_seqlen_q, max_seqlen_k, backend):
    return qi.new_empty((qi.shape[1], qi.shape[0], topk), dtype=torch.int32)


def _attention_path(backend: str, q: torch.Tensor, block_size: int) -> dispatch.Path:
    return dispatch.sparse_attention_path(backend, q.device, block_size=block_size,
                                          head_dim=q.shape[-1])


def _sparse_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           indices: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, block_size: int, softmax_scale: float,
                           max_seqlen_q: int, max_seqlen_k: int, deterministic: bool,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = _attention_path(backend, q, block_size)
    # The op is differentiated by its registered backward, never through the backend's own
    # autograd: its outputs must not carry a graph.
    with torch.no_grad():
        o, lse = path.attention_impl().sparse_attention(
            q, k, v, indices, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
            softmax_scale=softmax_scale, deterministic=deterministic)
    return o, lse


def _sparse_attention_fake(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, block_size,
                           softmax_scale, max_seqlen_q, max_seqlen_k, deterministic, backend):
    o = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:2], dtype=torch.float32)
    return o, lse


def _autograd_dispatch():
    """Autograd back on inside an op's implementation.

    A custom op's implementation runs below the Autograd dispatch key (torch.library's autograd
    kernel excludes the autograd keys from the thread-local dispatch state), so ops inside it
    record no graph even under ``torch.enable_grad()`` (and under a TorchDispatchMode such as
    opcheck's schema check, ADInplaceOrView is excluded too). This guard takes these keys out of
    the exclude set for its body (the state is restored on exit); torch's own higher-order ops
    use the same guard to run autograd inside their implementations."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor,
                keys.ADInplaceOrView):  # views and in-place ops under autograd need the last
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _reference_backward(impl, do, dlse, q, k, v, indices, cu_seqlens_q, cu_seqlens_k,
                        block_size, softmax_scale):
    """dq, dk, dv by torch autograd through the backend's (differentiable) forward."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with _autograd_dispatch(), torch.enable_grad():
        o, lse = impl.sparse_attention(*leaves, indices, cu_seqlens_q, cu_seqlens_k,
                                       block_size=block_size, softmax_scale=softmax_scale)
        outputs, grads = [], []
        if do is not None:
            outputs.append(o)
            grads.append(do.to(o.dtype))
        if dlse is not None:
            # Rows that see no key have lse = -inf and no gradient through it.
            outputs.append(lse)
            grads.append(dlse.to(lse.dtype).masked_fill(~torch.isfinite(lse), 0.0))
        if not outputs:
            return tuple(torch.zeros_like(t) for t in (q, k, v))
        dq, dk, dv = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip((dq, dk, dv), (q, k, v)))


def _sparse_attention_backward_impl(do: Optional[torch.Tensor], dlse: Optional[torch.Tensor],
                                    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    o: torch.Tensor, lse: torch.Tensor, indices: torch.Tensor,
                                    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                    block_size: int, softmax_scale: float, deterministic: bool,
                                    backend: str
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    path = _attention_path(backend, q, block_size)
    if path.attention == "triton":
        from msattn.ops.sparse_attention_bwd import sparse_attention_backward

        with torch.no_grad():
            return sparse_attention_backward(
                do, q, k, v, o, lse, indices, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                softmax_scale=softmax_scale, dlse=dlse, deterministic=deterministic)
    return _reference_backward(path.attention_impl(), do, dlse, q, k, v, indices, cu_seqlens_q,
                               cu_seqlens_k, block_size, softmax_scale)


def _sparse_attention_backward_fake(do, dlse, q, k, v, o, lse, indices, cu_seqlens_q,
                                    cu_seqlens_k, block_size, softmax_scale, deterministic,
                                    backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, indices, cu_seqlens_q, cu_seqlens_k, block_size, softmax_scale, _, _,
     deterministic, backend) = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, indices, cu_seqlens_q, cu_seqlens_k)
    ctx.block_size = block_size
    ctx.softmax_scale = softmax_scale
    ctx.deterministic = deterministic
    ctx.backend = backend
    # Eager autograd then passes None for an output the loss does not use (no zeros to read).
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dlse):
    no_grads = (None,) * 9
    if (do is None and dlse is None) or not any(ctx.needs_input_grad[:3]):
        return (None, None, None) + no_grads
    q, k, v, o, lse, indices, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.msattn.sparse_attention_backward(
        do, dlse, q, k, v, o, lse, indices, cu_seqlens_q, cu_seqlens_k, ctx.block_size,
        ctx.softmax_scale, ctx.deterministic, ctx.backend)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None) + no_grads


def _paged_select_impl(qi: torch.Tensor, index_cache: torch.Tensor, block_table: torch.Tensor,
                       cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, topk: int,
                       init_blocks: int, local_blocks: int, index_scale: Optional[torch.Tensor],
                       max_seqlen_q: int, backend: str,
                       index_block_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    path = dispatch.paged_path(backend, qi.device, page_size=index_cache.shape[1],
                               index_dim=qi.shape[2])
    with torch.no_grad():
        return path.select_impl().paged_select(
            qi, index_cache, block_table, cu_seqlens_q, seq_lens, topk=topk,
            init_blocks=init_blocks, local_blocks=local_blocks, index_scale=index_scale,
            index_block_scale=index_block_scale, max_seqlen_q=max_seqlen_q)


def _paged_select_fake(qi, index_cache, block_table, cu_seqlens_q, seq_lens, topk, init_blocks,
                       local_blocks, index_scale, max_seqlen_q, backend, index_block_scale=None):
    return qi.new_empty((qi.shape[1], qi.shape[0], topk), dtype=torch.int32)


def _paged_attention_impl(q: torch.Tensor, qi: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, index_cache: torch.Tensor,
                          block_table: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          seq_lens: torch.Tensor, topk: int, init_blocks: int, local_blocks: int,
                          softmax_scale: float, index_scale: Optional[torch.Tensor],
                          max_seqlen_q: int, backend: str, k_scale: Optional[torch.Tensor] = None,
                          v_scale: Optional[torch.Tensor] = None,
                          index_block_scale: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        o, lse = run_paged_attention(q, qi, k_cache, v_cache, index_cache, block_table,
                                     cu_seqlens_q, seq_lens, topk=topk, init_blocks=init_blocks,
                                     local_blocks=local_blocks, softmax_scale=softmax_scale,
                                     index_scale=index_scale, max_seqlen_q=max_seqlen_q,
                                     backend=backend, k_scale=k_scale, v_scale=v_scale,
                                     index_block_scale=index_block_scale)
    return o, lse


def _paged_attention_fake(q, qi, k_cache, v_cache, index_cache, block_table, cu_seqlens_q,
                          seq_lens, topk, init_blocks, local_blocks, softmax_scale, index_scale,
                          max_seqlen_q, backend, k_scale=None, v_scale=None,
                          index_block_scale=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Registration (once per process)
# ----------------------------------------------------------------------------------------------

def _registered(name: str) -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), name)


def _register() -> dict:
    """Define the ops that are not defined yet; returns ``{name: CustomOpDef}`` of those defined."""
    specs = {
        "select": (_select_impl, _select_fake),
        "sparse_attention": (_sparse_attention_impl, _sparse_attention_fake),
        "sparse_attention_backward": (_sparse_attention_backward_impl,
                                      _sparse_attention_backward_fake),
        "paged_select": (_paged_select_impl, _paged_select_fake),
        "paged_attention": (_paged_attention_impl, _paged_attention_fake),
    }
    defined = {}
    for name, (impl, fake) in specs.items():
        if _registered(name):
            continue
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=())
        op.register_fake(fake)
        defined[name] = op
    if "sparse_attention" in defined:
        defined["sparse_attention"].register_autograd(_backward, setup_context=_setup_context)
    return defined


try:
    _CUSTOM_OPS  # noqa: B018  (kept across importlib.reload: the module dict survives)
except NameError:
    _CUSTOM_OPS = _register()


# ----------------------------------------------------------------------------------------------
# Wrappers (varlen layout; arguments as the public msattn.msa_* functions)
# ----------------------------------------------------------------------------------------------

def select(qi: torch.Tensor, ki: torch.Tensor, cu_seqlens_q: torch.Tensor,
           cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int, max_seqlen_k: int,
           block_size: int = 128, topk: int = 16, init_blocks: int = 0, local_blocks: int = 1,
           backend: str = "auto") -> torch.Tensor:
    """``torch.ops.msattn.select``: :func:`msattn.msa_select` of varlen inputs, unchecked.

    Returns int32 ``[G, total_q, topk]``."""
    return torch.ops.msattn.select(qi, ki, cu_seqlens_q, cu_seqlens_k, block_size, topk,
                                   init_blocks, local_blocks, max_seqlen_q, max_seqlen_k, backend)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *,
                     max_seqlen_q: int, max_seqlen_k: int, block_size: int = 128,
                     softmax_scale: float | None = None, deterministic: bool = False,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.msattn.sparse_attention``: :func:`msattn.msa_sparse_attention` of varlen
    inputs, unchecked, differentiable in q, k, v. Returns ``(o, lse)``."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return torch.ops.msattn.sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k,
                                             block_size, scale, max_seqlen_q, max_seqlen_k,
                                             bool(deterministic), backend)


def paged_select(qi: torch.Tensor, index_cache: torch.Tensor, block_table: torch.Tensor,
                 cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *, max_seqlen_q: int,
                 topk: int = 16, init_blocks: int = 0, local_blocks: int = 1,
                 index_scale: torch.Tensor | None = None,
                 index_block_scale: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """``torch.ops.msattn.paged_select``: :func:`msattn.msa_paged_select`, unchecked."""
    return torch.ops.msattn.paged_select(qi, index_cache, block_table, cu_seqlens_q, seq_lens,
                                         topk, init_blocks, local_blocks, index_scale,
                                         max_seqlen_q, backend, index_block_scale)


def paged_attention(q: torch.Tensor, qi: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, index_cache: torch.Tensor, block_table: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *, max_seqlen_q: int,
                    topk: int = 16, init_blocks: int = 0, local_blocks: int = 1,
                    softmax_scale: float | None = None, index_scale: torch.Tensor | None = None,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    index_block_scale: torch.Tensor | None = None,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.msattn.paged_attention``: :func:`msattn.msa_paged_attention` with
    ``return_lse=True``, unchecked, forward only. Returns ``(o, lse)``."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return torch.ops.msattn.paged_attention(q, qi, k_cache, v_cache, index_cache, block_table,
                                            cu_seqlens_q, seq_lens, topk, init_blocks,
                                            local_blocks, scale, index_scale, max_seqlen_q,
                                            backend, k_scale, v_scale, index_block_scale)
