"""The prefill benchmark: MSA (indexer, sparse attention, both) against dense causal attention.

One row per sequence length. MSA runs through the public API in the varlen layout
(``q [N, H, D]``, ``k, v [N, G, D]``, ``qi [N, G, Di]``, ``ki [N, Di]``, int32 ``cu_seqlens``) on
random inputs. The same code serves the GPU suite and the CPU suite; only the settings differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Callable, Iterator

import torch

import msattn
from msattn import dispatch
from msattn._checks import FP8_DTYPE
from msattn.bench import metrics
from msattn.bench import peer as vllm_peer
from msattn.bench.dense import measure_dense, row_fields
from msattn.bench.report import dtype_name, format_length
from msattn.bench.timing import (add_input_sets, l2_cache_bytes, release_memory, synchronize,
                                 time_ms)
from msattn.config import MSAConfig

GIB = 1 << 30


@dataclass(frozen=True)
class PrefillSettings:
    """Everything one prefill run depends on."""

    op: str  # the rows' "op", e.g. "prefill"
    device: torch.device
    config: MSAConfig
    lengths: tuple[int, ...]
    batch: int
    dtype: torch.dtype
    backend: str
    warmup: int
    repeats: int
    time_budget_s: float  # per measurement; bounds the timed calls at long lengths
    dense: bool
    dense_max_len: int | None  # None: dense at every length
    seed: int = 0
    dense_kernels: tuple[str, ...] | None = None  # None: race every candidate of the device
    fp8_index: bool = False  # also time the fp8 index path (selection and msa_attention)
    peer: bool = False  # time vLLM's Triton prefill too where it can run (CUDA, its files present)

    def to_dict(self) -> dict:
        """JSON-ready copy."""
        return {**asdict(self), "device": str(self.device), "dtype": dtype_name(self.dtype),
                "lengths": list(self.lengths)}

    def timing(self) -> dict:
        """Keyword arguments of :func:`msattn.bench.timing.time_ms` other than ``device``."""
        return {"warmup": self.warmup, "repeats": self.repeats, "budget_s": self.time_budget_s}


@dataclass
class PrefillInputs:
    """One random input set of a prefill call, in the varlen layout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qi: torch.Tensor
    ki: torch.Tensor
    cu_seqlens: torch.Tensor
    indices: torch.Tensor | None = None  # filled by the indexer, read by the sparse attention

    @property
    def nbytes(self) -> int:
        tensors = (getattr(self, f.name) for f in fields(self))
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def make_inputs(settings: PrefillSettings, seq_len: int) -> PrefillInputs:
    """Random (never zero) inputs: ``settings.batch`` sequences of ``seq_len`` tokens."""
    config, total = settings.config, settings.batch * seq_len
    rand = partial(torch.randn, device=settings.device, dtype=settings.dtype)
    return PrefillInputs(
        q=rand(total, config.num_heads, config.head_dim),
        k=rand(total, config.num_kv_heads, config.head_dim),
        v=rand(total, config.num_kv_heads, config.head_dim),
        qi=rand(total, config.num_kv_heads, config.index_dim),
        ki=rand(total, config.index_dim),
        cu_seqlens=torch.arange(0, total + 1, seq_len, dtype=torch.int32, device=settings.device),
    )


def _select(settings: PrefillSettings, x: PrefillInputs, index_dtype=None) -> torch.Tensor:
    return msattn.msa_select(x.qi, x.ki, **settings.config.selection_kwargs(),
                             cu_seqlens_q=x.cu_seqlens, cu_seqlens_k=x.cu_seqlens,
                             index_dtype=index_dtype, backend=settings.backend)


def _sparse_attention(settings: PrefillSettings, x: PrefillInputs):
    return msattn.msa_sparse_attention(x.q, x.k, x.v, x.indices,
                                       block_size=settings.config.block_size,
                                       cu_seqlens_q=x.cu_seqlens, cu_seqlens_k=x.cu_seqlens,
                                       backend=settings.backend)


def _msa(settings: PrefillSettings, x: PrefillInputs, index_dtype=None) -> torch.Tensor:
    return msattn.msa_attention(x.q, x.k, x.v, x.qi, x.ki, **settings.config.selection_kwargs(),
                                cu_seqlens_q=x.cu_seqlens, cu_seqlens_k=x.cu_seqlens,
                                index_dtype=index_dtype, backend=settings.backend)


def fp8_agreement(bf16: torch.Tensor, fp8: torch.Tensor) -> dict:
    """How far the fp8 index path's selection ``fp8`` agrees with ``bf16`` (both ``[G, total_q,
    topk]``, ``-1`` padded): the fraction of rows with an identical set, and of the selected
    blocks that both chose."""
    a, b = bf16.sort(-1).values.contiguous(), fp8.sort(-1).values.contiguous()
    valid = a >= 0
    # block ids of a row are distinct: look each of a's blocks up in b's sorted row
    at = torch.searchsorted(b, a).clamp_max(b.shape[-1] - 1)
    common = ((b.gather(-1, at) == a) & valid).sum()
    return {"rows_identical": float((a == b).all(-1).float().mean()),
            "blocks_in_common": float(common / valid.sum().clamp_min(1))}


def executed_path(settings: PrefillSettings, seq_len: int | None = None) -> str:
    """Which implementation the MSA calls of ``seq_len`` tokens run (any length when None):
    :func:`msattn.dispatch.attention_path` for the bench's inputs, e.g. ``"triton"`` or
    ``"dense"``. It raises when the backend cannot run on the device."""
    c = settings.config
    path = dispatch.attention_path(settings.backend, settings.device, settings.dtype,
                                   block_size=c.block_size, topk=c.topk, head_dim=c.head_dim,
                                   index_dim=c.index_dim,
                                   max_seqlen_k=seq_len if seq_len is not None else 1 << 62)
    return path.attention + (f" ({path.reason})" if path.reason else "")


def _peak_memory_gib(settings: PrefillSettings, x: PrefillInputs) -> tuple[float | None, float | None]:
    """Peak allocated GiB during one ``msa_attention`` call, and that peak minus the memory held
    before the call (the inputs) and the output: the call's workspace. ``None`` off CUDA."""
    if settings.device.type != "cuda":
        return None, None
    _msa(settings, x)  # compilation and autotuning allocate outside the measured call
    synchronize(settings.device)
    before = torch.cuda.memory_allocated(settings.device)
    torch.cuda.reset_peak_memory_stats(settings.device)
    out = _msa(settings, x)
    synchronize(settings.device)
    peak = torch.cuda.max_memory_allocated(settings.device)
    extra = peak - before - out.numel() * out.element_size()
    return peak / GIB, extra / GIB


def _dense_skipped(settings: PrefillSettings, seq_len: int) -> str | None:
    """Why dense is not measured at ``seq_len``: "off" (--no-dense), "skipped" (beyond
    --dense-max-len), or None when it is."""
    if not settings.dense:
        return "off"
    if settings.dense_max_len is not None and seq_len > settings.dense_max_len:
        return "skipped"
    return None


def start_length(settings: PrefillSettings, seq_len: int) -> tuple[int, Callable]:
    """Seed the random inputs of ``seq_len``; returns the device's L2 size and ``measure(fn,
    sets)``, :func:`msattn.bench.timing.time_ms` with the timing of ``settings``."""
    torch.manual_seed(settings.seed + seq_len)
    return (l2_cache_bytes(settings.device),
            partial(time_ms, device=settings.device, **settings.timing()))


@torch.inference_mode()
def measure_length(settings: PrefillSettings, seq_len: int, progress: Callable[[str], None]) -> dict:
    """Measure one sequence length; returns the JSON row."""
    device, config, batch = settings.device, settings.config, settings.batch
    l2_bytes, measure = start_length(settings, seq_len)

    progress("peak memory")
    sets = [make_inputs(settings, seq_len)]
    peak_gib, extra_gib = _peak_memory_gib(settings, sets[0])
    add_input_sets(sets, partial(make_inputs, settings, seq_len), l2_bytes, sets[0].nbytes)
    progress("indexer")
    indexer = measure(partial(_select, settings), sets)
    for x in sets:
        x.indices = _select(settings, x)
    progress("sparse attention")
    attention = measure(partial(_sparse_attention, settings), sets)
    progress("msa_attention")
    total = measure(partial(_msa, settings), sets)
    progress("selection statistics")
    selection = metrics.selection_stats(sets[0].indices, seq_len=seq_len,
                                        block_size=config.block_size)
    peer = measure_peer(settings, sets, measure, progress)
    fp8 = {}
    if settings.fp8_index:
        progress("fp8 index path")
        fp8_indexer = measure(partial(_select, settings, index_dtype=FP8_DTYPE), sets)
        fp8_total = measure(partial(_msa, settings, index_dtype=FP8_DTYPE), sets)
        fp8 = {"fp8_indexer_ms": fp8_indexer.ms, "fp8_msa_ms": fp8_total.ms,
               "fp8_agreement": fp8_agreement(sets[0].indices,
                                              _select(settings, sets[0], index_dtype=FP8_DTYPE))}
    del sets
    release_memory(device)

    dense_status, dense = _dense_skipped(settings, seq_len), None
    if dense_status is None:
        progress("dense attention")
        dense = measure_dense(config, batch=batch, seq_len=seq_len, dtype=settings.dtype,
                              device=device, l2_bytes=l2_bytes, measure=measure,
                              kernels=settings.dense_kernels)
        dense_status = "measured" if dense.timing else "failed"
    dense_ms = dense.timing.ms if dense and dense.timing else None

    return {
        "op": settings.op,
        "seq_len": seq_len,
        "batch": batch,
        "dtype": dtype_name(settings.dtype),
        "index_dtype": dtype_name(settings.dtype),  # qi / ki share the dtype of q, k, v here
        "backend": settings.backend,
        "msa_path": executed_path(settings, seq_len),
        "msa_ms": total.ms,
        "dense_ms": dense_ms,
        "speedup": dense_ms / total.ms if dense_ms else None,
        "indexer_ms": indexer.ms,
        "attention_ms": attention.ms,
        "indexer_tflops": metrics.tflops(metrics.indexer_flops(config, seq_len, batch), indexer.ms),
        "attention_tflops": metrics.tflops(metrics.sparse_attention_flops(config, seq_len, batch),
                                           attention.ms),
        "dense_tflops": metrics.tflops(metrics.dense_attention_flops(config, seq_len, batch),
                                       dense_ms),
        **row_fields(dense_status, dense),
        "peak_memory_gib": peak_gib,
        "extra_memory_gib": extra_gib,
        "selection": selection,
        **peer,
        "msa_over_peer": total.ms / peer["peer_ms"] if peer.get("peer_ms") else None,
        **fp8,
        "fp8_speedup": dense_ms / fp8["fp8_msa_ms"] if fp8 and dense_ms else None,
        "runs": {"indexer": indexer.runs, "attention": attention.runs, "msa": total.runs,
                 "dense": dense.timing.runs if dense and dense.timing else 0},
    }


def peer_skip_reason(settings: PrefillSettings, seq_len: int) -> str | None:
    """Why vLLM's prefill is not timed beside msattn's (``None`` when it is)."""
    if not settings.peer:
        return "off"
    if seq_len % vllm_peer.PEER_PAGE_SIZE:
        return f"the peer's sequence fills whole {vllm_peer.PEER_PAGE_SIZE}-token pages"
    config = settings.config
    reason = vllm_peer.unsupported_reason(page_size=config.block_size, index_dim=config.index_dim,
                                          q_tokens_per_request=[1], device=settings.device)
    if reason is None and settings.batch != 1:
        reason = "the peer's prefill runs one sequence"
    if reason is None and not vllm_peer.available():
        reason = f"vLLM's files are not in {vllm_peer.peer_dir()}"
    return reason


def measure_peer(settings: PrefillSettings, sets: list, measure: Callable, progress) -> dict:
    """vLLM's prefill (:func:`msattn.bench.peer.make_peer_prefill`: chunks of 16K queries, select
    then attend) timed over the same input sets as msattn's (caches converted outside the
    timing), with its selection's agreement and its output's largest difference from
    ``msa_attention``'s on set 0. A failure to import, compile or run it is recorded."""
    skipped = peer_skip_reason(settings, sets[0].q.shape[0])
    if skipped is not None:
        return {"peer_ms": None, "peer_skipped": skipped}
    progress("vLLM's prefill")
    config = settings.config

    def steps():
        modules = vllm_peer.load()
        return [vllm_peer.make_peer_prefill(
            modules, x.q, x.qi, vllm_peer.contiguous_cache(x.k, x.v, x.ki), topk=config.topk,
            init_blocks=config.init_blocks, local_blocks=config.local_blocks,
            softmax_scale=config.head_dim ** -0.5) for x in sets]

    return vllm_peer.time_peer(steps, measure, settings.device,
                               lambda: (sets[0].indices, _msa(settings, sets[0])))


def run_lengths(settings: PrefillSettings, progress, measure_length: Callable) -> Iterator[dict]:
    """``measure_length(settings, seq_len, progress)`` for every length of ``settings`` in turn,
    yielding each row as soon as it is measured; ``progress`` is a
    :class:`msattn.bench.report.Progress`."""
    for seq_len in settings.lengths:
        progress.step(f"N={format_length(seq_len)}")
        yield measure_length(settings, seq_len, progress)
        release_memory(settings.device)


def run(settings: PrefillSettings, progress) -> Iterator[dict]:
    """Measure every length of ``settings`` in turn (see :func:`run_lengths`)."""
    yield from run_lengths(settings, progress, measure_length)
