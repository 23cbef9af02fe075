"""The training benchmark: one training step of the MSA attention against dense causal attention
forward + backward.

One row per sequence length. An MSA step is what a training step does to one attention layer:

1. ``msa_select(qi, ki)`` (no gradient; the selection is a constant);
2. ``msa_sparse_attention(q, k, v, indices)`` forward, keeping ``lse``;
3. its backward, ``dq, dk, dv`` for a random output gradient ``do``;
4. ``msa_indexer_loss(q, k, qi, ki, indices, lse=lse)`` forward (the index branch's KL loss);
5. its backward, ``dqi, dki``.

Each call of the step records an event (CUDA) or a clock reading (CPU) between the stages, so one
measurement gives the step's median time and the median of every stage. Dense is
``scaled_dot_product_attention(is_causal=True)`` forward + backward in ``[B, H, N, D]``, raced
between the SDPA kernels of the device (cuDNN and flash on CUDA), native GQA first, K/V
expanded to ``H`` heads otherwise.

FLOP model of the sparse backward (the official MSA model): ``2 * (3 * D + 2 * D) * H *
sparse_elements``, where ``sparse_elements`` is the number of (query, key) pairs one head
attends, averaged over the heads: the (group, query, key) triples of the selection, causal-masked,
counted exactly on the device (:func:`attended_pairs`), divided by ``G``. The forward uses
``2 * 2 * D * H * sparse_elements`` and dense the same two models over the causal pairs
``N * (N + 1) / 2``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, fields
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import msattn
from msattn import dispatch
from msattn.bench import metrics
from msattn.bench.dense import DenseResult, _first_line, candidates, row_fields
from msattn.bench.prefill import PrefillSettings, _dense_skipped, run_lengths, start_length
from msattn.bench.report import dense_ms_cell, dtype_name, format_length, number_cell
from msattn.bench.timing import add_input_sets, release_memory, synchronize

GIB = 1 << 30
MSA_STAGES = ("select", "attention_fwd", "attention_bwd", "loss_fwd", "loss_bwd")
DENSE_STAGES = ("fwd", "bwd")

# The settings of a training run are those of a prefill run (shape, lengths, timing, dense).
TrainSettings = PrefillSettings


# ----------------------------------------------------------------------------------------------
# Cost model
# ----------------------------------------------------------------------------------------------

def attended_pairs(indices: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                   block_size: int) -> int:
    """Exact number of (group, query, key) triples a selection attends, on ``indices``' device.

    ``indices`` int32 ``[G, total_q, topk]`` (varlen layout, ``-1`` padding); the queries of
    sequence ``b`` are the last ``len_q(b)`` positions of its ``len_k(b)`` keys. A selected block
    ``c`` of a query at position ``p`` contributes its keys ``j <= p`` (and ``j < len_k``):
    ``clamp(min(p + 1, len_k) - c * bs, 0, bs)``. One host sync (the result)."""
    device = indices.device
    lens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    total_q = indices.shape[1]
    seq = torch.repeat_interleave(torch.arange(lens_q.numel(), device=device), lens_q,
                                  output_size=total_q)
    position = (torch.arange(total_q, device=device) - cu_seqlens_q[:-1].long()[seq]
                + (lens_k - lens_q)[seq])
    end = torch.minimum(position + 1, lens_k[seq])[:, None]  # keys j < end are visible
    total = torch.zeros((), dtype=torch.int64, device=device)
    for blocks in indices:  # one group at a time: [total_q, topk]
        blocks = blocks.long()
        keys = (end - blocks * block_size).clamp(0, block_size)
        total += torch.where(blocks >= 0, keys, 0).sum()
    return int(total)


def sparse_bwd_flops(config, pairs: int) -> int:
    """``2 * (3 * D + 2 * D) * H * sparse_elements`` with ``sparse_elements = pairs / G``."""
    return 2 * 5 * config.head_dim * (config.num_heads // config.num_kv_heads) * pairs


def sparse_fwd_flops(config, pairs: int) -> int:
    """``2 * 2 * D * H * sparse_elements`` with ``sparse_elements = pairs / G``."""
    return 2 * 2 * config.head_dim * (config.num_heads // config.num_kv_heads) * pairs


def causal_pairs(seq_len: int, batch: int = 1) -> int:
    """(query, key) pairs of dense causal attention: ``N * (N + 1) / 2`` per sequence."""
    return batch * seq_len * (seq_len + 1) // 2


# ----------------------------------------------------------------------------------------------
# Stage clock
# ----------------------------------------------------------------------------------------------

class StageClock:
    """Marks between the stages of every call: CUDA events on CUDA (read after a sync), the host
    clock on the CPU (where ops run synchronously). ``start()`` opens a call, ``mark()`` closes a
    stage."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.calls: list[list] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.calls.append([self._now()])

    def mark(self) -> None:
        self.calls[-1].append(self._now())

    def _elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def stage_ms(self, names: tuple[str, ...], last: int) -> dict[str, float]:
        """Median milliseconds of each stage over the ``last`` calls (call after a sync)."""
        calls = self.calls[-last:]
        return {name: statistics.median(self._elapsed_ms(c[i], c[i + 1]) for c in calls)
                for i, name in enumerate(names)}


# ----------------------------------------------------------------------------------------------
# MSA step
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainInputs:
    """One random input set of a training step, in the varlen layout."""

    q: torch.Tensor  # [N, H, D], requires grad
    k: torch.Tensor  # [N, G, D], requires grad
    v: torch.Tensor
    qi: torch.Tensor  # [N, G, Di], requires grad
    ki: torch.Tensor  # [N, Di], requires grad
    do: torch.Tensor  # [N, H, D], the output gradient
    cu_seqlens: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(getattr(self, f.name)) for f in fields(self))


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def make_inputs(settings: TrainSettings, seq_len: int) -> TrainInputs:
    """Random (never zero) inputs: ``settings.batch`` sequences of ``seq_len`` tokens."""
    config, total = settings.config, settings.batch * seq_len

    def rand(*shape):
        return torch.randn(*shape, device=settings.device, dtype=settings.dtype).requires_grad_()

    return TrainInputs(
        q=rand(total, config.num_heads, config.head_dim),
        k=rand(total, config.num_kv_heads, config.head_dim),
        v=rand(total, config.num_kv_heads, config.head_dim),
        qi=rand(total, config.num_kv_heads, config.index_dim),
        ki=rand(total, config.index_dim),
        do=torch.randn(total, config.num_heads, config.head_dim, device=settings.device,
                       dtype=settings.dtype),
        cu_seqlens=torch.arange(0, total + 1, seq_len, dtype=torch.int32, device=settings.device),
    )


def msa_step(settings: TrainSettings, seq_len: int, x: TrainInputs, clock: StageClock | None = None):
    """One training step of the attention (the five stages of the module docstring); returns
    ``(indices, o, lse, loss, (dq, dk, dv), (dqi, dki))``."""
    mark = clock.mark if clock is not None else (lambda: None)
    if clock is not None:
        clock.start()
    c = settings.config
    seq = {"cu_seqlens_q": x.cu_seqlens, "cu_seqlens_k": x.cu_seqlens, "max_seqlen_q": seq_len,
           "max_seqlen_k": seq_len, "backend": settings.backend}
    with torch.no_grad():
        indices = msattn.msa_select(x.qi, x.ki, **c.selection_kwargs(), **seq)
    mark()
    o, lse = msattn.msa_sparse_attention(x.q, x.k, x.v, indices, block_size=c.block_size, **seq)
    mark()
    grads = torch.autograd.grad(o, (x.q, x.k, x.v), x.do)
    mark()
    loss = msattn.msa_indexer_loss(x.q, x.k, x.qi, x.ki, indices, block_size=c.block_size,
                                   lse=lse, **seq)
    mark()
    index_grads = torch.autograd.grad(loss, (x.qi, x.ki))
    mark()
    return indices, o, lse, loss, grads, index_grads


def _peak_memory_gib(settings: TrainSettings, seq_len: int, x: TrainInputs):
    """``(peak, extra)`` GiB of one step: the peak allocation, and the peak minus what was held
    before (the inputs) and what the step returns (outputs and gradients). ``None`` off CUDA."""
    if settings.device.type != "cuda":
        return None, None
    synchronize(settings.device)
    before = torch.cuda.memory_allocated(settings.device)
    torch.cuda.reset_peak_memory_stats(settings.device)
    indices, o, lse, loss, grads, index_grads = msa_step(settings, seq_len, x)
    synchronize(settings.device)
    peak = torch.cuda.max_memory_allocated(settings.device)
    kept = _nbytes(indices, o, lse, loss, *grads, *index_grads)
    return peak / GIB, (peak - before - kept) / GIB


# ----------------------------------------------------------------------------------------------
# Dense step
# ----------------------------------------------------------------------------------------------

def _dense_sets(settings: TrainSettings, seq_len: int, l2_bytes: int) -> list[tuple]:
    c, batch = settings.config, settings.batch

    def make_set():
        rand = partial(torch.randn, device=settings.device, dtype=settings.dtype)
        q = rand(batch, c.num_heads, seq_len, c.head_dim).requires_grad_()
        k = rand(batch, c.num_kv_heads, seq_len, c.head_dim).requires_grad_()
        v = rand(batch, c.num_kv_heads, seq_len, c.head_dim).requires_grad_()
        return q, k, v, torch.randn_like(q)

    sets = [make_set()]
    return add_input_sets(sets, make_set, l2_bytes, _nbytes(*sets[0]))


def dense_step(qkv_do, *, kernel: SDPBackend, gqa: bool, clock: StageClock | None = None):
    """Dense causal attention forward + backward; returns ``(o, (dq, dk, dv))``."""
    q, k, v, do = qkv_do
    if clock is not None:
        clock.start()
    with sdpa_kernel([kernel]):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if clock is not None:
            clock.mark()
        grads = torch.autograd.grad(o, (q, k, v), do)
    if clock is not None:
        clock.mark()
    return o, grads


def _expand(qkv_do):
    q, k, v, do = qkv_do
    rep = q.shape[1] // k.shape[1]
    expand = lambda t: t.detach().repeat_interleave(rep, dim=1).requires_grad_()
    return q, expand(k), expand(v), do


def measure_dense_train(settings: TrainSettings, seq_len: int, l2_bytes: int, measure: Callable):
    """Race the dense kernels of the device (forward + backward); returns the
    :class:`msattn.bench.dense.DenseResult` and the winner's per-stage medians."""
    sets = _dense_sets(settings, seq_len, l2_bytes)
    result, stages = DenseResult(), None
    for name, kernel in candidates(settings.device, settings.dense_kernels).items():
        clock = StageClock(settings.device)
        try:
            label, candidate_sets, gqa = name, sets, True
            try:
                dense_step(sets[0], kernel=kernel, gqa=True)  # also the first (untimed) call
            except RuntimeError as error:
                if isinstance(error, torch.OutOfMemoryError):
                    raise
                label, candidate_sets, gqa = f"{name}+expanded-kv", [_expand(s) for s in sets], False
                dense_step(candidate_sets[0], kernel=kernel, gqa=False)
            timing = measure(partial(dense_step, kernel=kernel, gqa=gqa, clock=clock),
                             candidate_sets)
        except RuntimeError as error:  # unsupported here, or out of memory
            result.failures[name] = _first_line(error)
        else:
            result.candidates_ms[label] = timing.ms
            if result.timing is None or timing.ms < result.timing.ms:
                result.timing, result.backend = timing, label
                stages = clock.stage_ms(DENSE_STAGES, timing.runs)
        candidate_sets = None
        release_memory(settings.device)
    return result, stages


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------

def executed_path(settings: TrainSettings) -> str:
    """The backends the step's calls run, e.g. ``"triton"``; raises when the backend cannot run
    on the device."""
    c = settings.config
    paths = [dispatch.select_path(settings.backend, settings.device, block_size=c.block_size,
                                  index_dim=c.index_dim),
             dispatch.sparse_attention_path(settings.backend, settings.device,
                                            block_size=c.block_size, head_dim=c.head_dim),
             dispatch.indexer_loss_path(settings.backend, settings.device,
                                        block_size=c.block_size, head_dim=c.head_dim,
                                        index_dim=c.index_dim)]
    names = dict.fromkeys(p.attention for p in paths)
    reasons = dict.fromkeys(p.reason for p in paths if p.reason)
    return "/".join(names) + (f" ({'; '.join(reasons)})" if reasons else "")


def header(env: dict, settings: TrainSettings, ceiling: float, matmul_size: int) -> str:
    c = settings.config
    return (f"MSA {settings.op} (select + sparse attention fwd/bwd + indexer loss fwd/bwd) on "
            f"{env['device']}: backend {settings.backend} ({executed_path(settings)}), "
            f"{dtype_name(settings.dtype)}, batch {settings.batch}, H={c.num_heads} "
            f"G={c.num_kv_heads} D={c.head_dim} Di={c.index_dim}, block {c.block_size}, "
            f"top-{c.topk} (init {c.init_blocks}, local {c.local_blocks}); dense: SDPA causal "
            f"fwd + bwd\nmatmul ceiling ({matmul_size}^3 {dtype_name(settings.dtype)}): "
            f"{ceiling:.1f} TFLOP/s")


def measure_length(settings: TrainSettings, seq_len: int, progress: Callable[[str], None]) -> dict:
    """Measure one sequence length; returns the JSON row."""
    device, config, batch = settings.device, settings.config, settings.batch
    l2_bytes, measure = start_length(settings, seq_len)

    progress("first step and peak memory")
    sets = [make_inputs(settings, seq_len)]
    first = msa_step(settings, seq_len, sets[0])  # compilation, autotuning
    indices, loss_value = first[0], float(first[3].detach())
    pairs = attended_pairs(indices, sets[0].cu_seqlens, sets[0].cu_seqlens, config.block_size)
    selection = metrics.selection_stats(indices, seq_len=seq_len, block_size=config.block_size)
    del first, indices
    peak_gib, extra_gib = _peak_memory_gib(settings, seq_len, sets[0])
    add_input_sets(sets, partial(make_inputs, settings, seq_len), l2_bytes, sets[0].nbytes)
    progress("training step")
    clock = StageClock(device)
    total = measure(lambda x: msa_step(settings, seq_len, x, clock), sets)
    stages = clock.stage_ms(MSA_STAGES, total.runs)
    del sets, clock
    release_memory(device)

    dense_status, dense, dense_stages = _dense_skipped(settings, seq_len), None, None
    if dense_status is None:
        progress("dense attention fwd + bwd")
        dense, dense_stages = measure_dense_train(settings, seq_len, l2_bytes, measure)
        dense_status = "measured" if dense.timing else "failed"
    dense_ms = dense.timing.ms if dense and dense.timing else None
    tokens = batch * seq_len
    bwd_flops = sparse_bwd_flops(config, pairs)
    dense_pairs = causal_pairs(seq_len, batch)

    return {
        "op": settings.op,
        "seq_len": seq_len,
        "batch": batch,
        "dtype": dtype_name(settings.dtype),
        "backend": settings.backend,
        "msa_path": executed_path(settings),
        "msa_ms": total.ms,
        "dense_ms": dense_ms,
        "speedup": dense_ms / total.ms if dense_ms else None,
        **{f"{name}_ms": ms for name, ms in stages.items()},
        "dense_fwd_ms": dense_stages["fwd"] if dense_stages else None,
        "dense_bwd_ms": dense_stages["bwd"] if dense_stages else None,
        "sparse_pairs": pairs,
        "sparse_elements": pairs / config.num_kv_heads,
        "sparse_bwd_flops": bwd_flops,
        "sparse_bwd_tflops": metrics.tflops(bwd_flops, stages["attention_bwd"]),
        "sparse_fwd_tflops": metrics.tflops(sparse_fwd_flops(config, pairs), stages["attention_fwd"]),
        "dense_bwd_tflops": metrics.tflops(10 * config.head_dim * config.num_heads * dense_pairs,
                                           dense_stages["bwd"] if dense_stages else None),
        "tokens_per_s": tokens / (total.ms / 1e3),
        "dense_tokens_per_s": tokens / (dense_ms / 1e3) if dense_ms else None,
        "indexer_loss": loss_value,
        **row_fields(dense_status, dense),
        "peak_memory_gib": peak_gib,
        "extra_memory_gib": extra_gib,
        "selection": selection,
        "runs": {"msa": total.runs, "dense": dense.timing.runs if dense and dense.timing else 0},
    }


def run(settings: TrainSettings, progress) -> Iterator[dict]:
    """Measure every length of ``settings`` in turn (see :func:`msattn.bench.prefill.run_lengths`)."""
    yield from run_lengths(settings, progress, measure_length)


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------

CELLS: dict[str, Callable[[dict], str]] = {
    "length": lambda row: format_length(row["seq_len"]),
    "select": number_cell("select_ms", ".2f"),
    "attn fwd": number_cell("attention_fwd_ms", ".2f"),
    "attn bwd": number_cell("attention_bwd_ms", ".2f"),
    "loss fwd": number_cell("loss_fwd_ms", ".2f"),
    "loss bwd": number_cell("loss_bwd_ms", ".2f"),
    "MSA ms": number_cell("msa_ms", ".2f"),
    "dense ms": dense_ms_cell,
    "dense kernel": lambda row: row["dense_backend"] or "-",
    "speedup": number_cell("speedup", ".3g", suffix="x"),
    "bwd TFLOP/s": number_cell("sparse_bwd_tflops", ".1f"),
    "Mtok/s": number_cell("tokens_per_s", ".3g", 1e-6),
    "peak GiB": number_cell("peak_memory_gib", ".2f"),
    "extra GiB": number_cell("extra_memory_gib", ".2f"),
    "key sparsity": lambda row: f"{row['selection']['key_sparsity'] * 100:.1f}%",
}

COLUMNS = ("length", "select", "attn fwd", "attn bwd", "loss fwd", "loss bwd", "MSA ms",
           "dense ms", "dense kernel", "speedup", "bwd TFLOP/s", "Mtok/s", "peak GiB",
           "extra GiB")
CPU_COLUMNS = ("length", "key sparsity", "select", "attn fwd", "attn bwd", "loss fwd",
               "loss bwd", "MSA ms", "dense ms", "dense kernel", "speedup")
