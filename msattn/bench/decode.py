"""The decode benchmark: MSA against paged caches versus dense decode attention.

One row per (sequence length, batch, query tokens per request, index-key dtype). Every request of
a point holds ``seq_len`` tokens in a paged cache (``k_cache, v_cache [num_pages, page_size, G, D]``,
``index_cache [num_pages, page_size, Di]`` in bf16/fp16, or fp8 with per-token float32 scales)
whose pages sit in a random physical order; block tables carry a ``-1`` column past the last
page. The query tokens of a request are its last ``q_tokens`` positions. Data is random (never
zeros).

MSA: on a GPU with the Triton backend, :class:`msattn.MSAPagedWrapper` is planned once, run once
per input set (compilation, autotuning), its ``run`` captured in one CUDA graph per input set, and
the graphs replayed (``msa_method`` "cuda-graph"). Without graphs (``--no-graphs``, or a capture
that fails, recorded in ``graph_failures``) the wrapper's ``run`` is called eagerly
("wrapper"); with the reference backend the functional :func:`msattn.msa_paged_attention` is
called ("functional").

Dense: ``scaled_dot_product_attention`` over contiguous ``[B, G, S, D]`` copies of the same K/V
(native GQA, else K/V expanded to ``H`` heads when that fits in memory), raced over the SDPA
kernels of the device, each captured in CUDA graphs when possible; more than one query token per
request uses an explicit bottom-right causal mask (queries are the last positions), and on CUDA
also the flash kernel's own causal mode, which aligns the mask that way when ``T < S``. The
fastest candidate is the baseline; every candidate's time and every failure are recorded.

Achieved bandwidth uses the byte model of ``docs/MSA.md`` (see :func:`msa_bytes`,
:func:`dense_bytes`) against a measured bandwidth ceiling (:func:`bandwidth_ceiling_gbps`); the
byte floor is the time the step's bytes take at that ceiling (:func:`byte_floor_us`).

Workloads (:data:`WORKLOADS`): "random" index queries, or "correlated" ones, where the tokens of a
request share a base query per group (``qi = base + 0.05 * noise``), as adjacent draft tokens
choose mostly the same pages. One query token per request has nothing to correlate: that point is
measured once, as "random" (unless only "correlated" is asked for).

Peer: where vLLM's Triton MiniMax-M3 files are there (:mod:`msattn.bench.peer`) and the device is
CUDA, vLLM's decode runs on the same data, timed the same way (its own input sets, CUDA graphs,
median), with its selection compared to msattn's. With ``breakdown`` the device time of each
kernel of a step is recorded too (:func:`kernel_breakdown`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import msattn
from msattn import dispatch
from msattn.bench import peer as vllm_peer
from msattn.bench.dense import DenseResult, _first_line
from msattn.bench.prefill import _dense_skipped
from msattn.bench.report import dtype_name, format_length
from msattn.bench.timing import (Timing, l2_cache_bytes, release_memory, synchronize, time_ms)
from msattn._checks import NVFP4_DTYPE
from msattn.cache import FP8_DTYPE, quantize_index_keys
from msattn.ops.nvfp4 import NVFP4_BLOCK, quantize_nvfp4
from msattn.config import MSAConfig

GIB = 1 << 30
# Index-key dtypes by the names used in the rows and on the command line ("nvfp4": the 4-bit
# keys of msattn.ops.nvfp4, uint8 codes with e4m3 block scales and float32 token scales).
INDEX_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": FP8_DTYPE,
                "nvfp4": NVFP4_DTYPE}
# Input sets rotated through at most (decode touches little memory per call: short contexts need
# many sets to span twice the L2 cache).
MAX_INPUT_SETS = 32
# Dense kernels raced on each device type, by the name recorded in the results.
DENSE_CANDIDATES = {
    "cuda": {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION},
    "cpu": {"flash": SDPBackend.FLASH_ATTENTION},
}
# K/V expanded to H heads is only tried while it takes at most this share of the free memory.
_EXPAND_MEMORY_SHARE = 0.5
# Index-query workloads, by the names used in the rows and on the command line.
WORKLOADS = ("random", "correlated")
# Scale of the per-token noise around a request's base index query in the correlated workload.
CORRELATED_NOISE = 0.05
# Graph replays (or eager calls) profiled for the per-kernel breakdown.
BREAKDOWN_CALLS = 20


@dataclass(frozen=True)
class DecodeSettings:
    """Everything one decode run depends on."""

    op: str  # the rows' "op": "decode", "decode-multi" or "decode-cpu"
    device: torch.device
    config: MSAConfig
    lengths: tuple[int, ...]
    batches: tuple[int, ...]
    q_tokens: tuple[int, ...]  # query tokens per request
    index_dtypes: tuple[str, ...]  # keys of INDEX_DTYPES
    dtype: torch.dtype  # q, K/V
    backend: str
    graphs: bool  # CUDA-graph replays (CUDA only)
    warmup: int
    repeats: int
    time_budget_s: float
    dense: bool
    dense_max_len: int | None
    bandwidth_bytes: int  # size of the buffer of the bandwidth-ceiling measurement
    seed: int = 0
    workloads: tuple[str, ...] = ("random",)  # of WORKLOADS
    peer: bool = True  # time vLLM's decode too where it can run (CUDA, its files present)
    breakdown: bool = False  # per-kernel device times (CUDA only)
    # Consecutive steps (on consecutive input sets) in one CUDA graph, as a model runs its layers
    # in one graph: a replay's host-side launch cost (~10-20 us on the H200 machine, more than a
    # short decode step) is paid once per graph; a step's time is the graph's over this count.
    steps_per_graph: int = 8

    def to_dict(self) -> dict:
        """JSON-ready copy."""
        return {**asdict(self), "device": str(self.device), "dtype": dtype_name(self.dtype),
                "lengths": list(self.lengths), "batches": list(self.batches),
                "q_tokens": list(self.q_tokens), "index_dtypes": list(self.index_dtypes),
                "workloads": list(self.workloads)}

    def timing(self) -> dict:
        """Keyword arguments of :func:`msattn.bench.timing.time_ms` other than ``device``."""
        return {"warmup": self.warmup, "repeats": self.repeats, "budget_s": self.time_budget_s}

    @property
    def use_graphs(self) -> bool:
        return self.graphs and self.device.type == "cuda"

    def workloads_for(self, q_tokens: int) -> tuple[str, ...]:
        """The workloads measured at ``q_tokens`` per request: with one token, "correlated" is
        "random" and is not measured twice."""
        if q_tokens == 1 and "random" in self.workloads:
            return ("random",)
        return self.workloads


# ----------------------------------------------------------------------------------------------
# Byte model
# ----------------------------------------------------------------------------------------------

def index_bytes_per_token(config: MSAConfig, index_dtype: str) -> int:
    """Bytes of one token's index key (plus its float32 scale with fp8, and its e4m3 block
    scales and float32 scale with 4-bit keys)."""
    if index_dtype == "fp8":
        return config.index_dim + 4
    if index_dtype == "nvfp4":
        return config.index_dim // 2 + config.index_dim // NVFP4_BLOCK + 4
    return config.index_dim * INDEX_DTYPES[index_dtype].itemsize


def msa_bytes(config: MSAConfig, *, seq_len: int, batch: int, q_tokens: int, index_dtype: str,
              kv_bytes: int = 2) -> int:
    """Bytes an MSA decode step reads: every request's index keys (and fp8 scales) once, plus
    for every query token and group the K and V of the selected blocks, ``topk * page_size``
    tokens capped by ``seq_len``: ``G * min(topk * bs, S) * D * 2 * kv_bytes`` per query token."""
    selected = min(config.topk * config.block_size, seq_len)
    per_request = (seq_len * index_bytes_per_token(config, index_dtype)
                   + q_tokens * config.num_kv_heads * selected * config.head_dim * 2 * kv_bytes)
    return batch * per_request


def dense_bytes(config: MSAConfig, *, seq_len: int, batch: int, kv_bytes: int = 2) -> int:
    """Bytes a dense decode step reads: all K and V, ``S * G * D * 2 * kv_bytes`` per request."""
    return batch * seq_len * config.num_kv_heads * config.head_dim * 2 * kv_bytes


def gbps(num_bytes: int, ms: float | None) -> float | None:
    """GB/s (10^9 bytes per second) of moving ``num_bytes`` in ``ms`` milliseconds."""
    return None if not ms else num_bytes / (ms * 1e6)


def byte_floor_us(num_bytes: int, bandwidth_gbps: float | None) -> float | None:
    """Microseconds that moving ``num_bytes`` takes at ``bandwidth_gbps`` (the byte floor)."""
    return num_bytes / (bandwidth_gbps * 1e3) if bandwidth_gbps else None


def num_decode_sets(touched_bytes: int, l2_bytes: int) -> int:
    """Input sets to rotate through so that the bytes the calls touch span twice the L2 cache."""
    if touched_bytes <= 0 or l2_bytes <= 0:
        return 1
    return max(1, min(MAX_INPUT_SETS, math.ceil(2 * l2_bytes / touched_bytes)))


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

@dataclass
class CacheSet:
    """One paged cache of ``batch`` requests of ``seq_len`` tokens, pages in random order."""

    k_cache: torch.Tensor  # [num_pages, page_size, G, D]
    v_cache: torch.Tensor
    # dtype name -> (cache, token scale or None, block scale or None (4-bit keys only))
    index: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]
    block_table: torch.Tensor  # int32 [B, pages_per_request + 1], last column -1
    seq_lens: torch.Tensor  # int32 [B]
    seq_len: int

    @property
    def pages_per_request(self) -> int:
        return self.block_table.shape[1] - 1

    @property
    def nbytes(self) -> int:
        tensors = [self.k_cache, self.v_cache, *(t for keys in self.index.values() for t in keys)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def make_cache_set(settings: DecodeSettings, seq_len: int, batch: int) -> CacheSet:
    """Random K/V and index keys (one set of keys, stored in every index dtype of ``settings``)
    in ``batch * ceil(seq_len / page_size)`` pages handed out in a random order."""
    config, device = settings.config, settings.device
    page_size = config.block_size
    pages = math.ceil(seq_len / page_size)
    num_pages = batch * pages
    rand = partial(torch.randn, device=device, dtype=settings.dtype)
    k_cache = rand(num_pages, page_size, config.num_kv_heads, config.head_dim)
    v_cache = rand(num_pages, page_size, config.num_kv_heads, config.head_dim)
    keys = torch.randn(num_pages, page_size, config.index_dim, device=device, dtype=torch.bfloat16)
    index = {}
    for name in settings.index_dtypes:
        if name == "nvfp4":
            packed, block_scale, token_scale = quantize_nvfp4(keys)
            index[name] = (packed, token_scale, block_scale)
        elif INDEX_DTYPES[name] == FP8_DTYPE:
            index[name] = (*quantize_index_keys(keys), None)
        else:
            index[name] = (keys.to(INDEX_DTYPES[name]), None, None)
    del keys
    order = torch.randperm(num_pages, device=device).view(batch, pages).to(torch.int32)
    padding = torch.full((batch, 1), -1, dtype=torch.int32, device=device)
    return CacheSet(k_cache=k_cache, v_cache=v_cache, index=index,
                    block_table=torch.cat([order, padding], dim=1),
                    seq_lens=torch.full((batch,), seq_len, dtype=torch.int32, device=device),
                    seq_len=seq_len)


@dataclass
class Queries:
    """The new tokens of one decode step: ``q [B * T, H, D]``, ``qi [B * T, G, Di]``."""

    q: torch.Tensor
    qi: torch.Tensor
    cu_seqlens_q: torch.Tensor  # int32 [B + 1] on the device


def make_queries(settings: DecodeSettings, batch: int, q_tokens: int,
                 workload: str = "random") -> Queries:
    """Random queries; with ``workload="correlated"`` the index queries of request ``b`` are
    ``base[b, g] + CORRELATED_NOISE * noise[b, t, g]`` (one random base per request and group)."""
    config, device = settings.config, settings.device
    total = batch * q_tokens
    rand = partial(torch.randn, device=device, dtype=torch.float32)
    qi = rand(batch, q_tokens, config.num_kv_heads, config.index_dim)
    if workload == "correlated":
        qi = rand(batch, 1, config.num_kv_heads, config.index_dim) + CORRELATED_NOISE * qi
    elif workload != "random":
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    return Queries(
        q=torch.randn(total, config.num_heads, config.head_dim, device=device, dtype=settings.dtype),
        qi=qi.view(total, config.num_kv_heads, config.index_dim).to(settings.dtype),
        cu_seqlens_q=torch.arange(0, total + 1, q_tokens, dtype=torch.int32, device=device))


def dense_kv(cache: CacheSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``[B, G, S, D]`` copies of the logical K and V sequences of a paged cache
    (copied one request at a time, so the only temporary is one request's pages)."""
    pages = cache.block_table[:, :cache.pages_per_request].long()
    batch = pages.shape[0]
    _, _, num_groups, head_dim = cache.k_cache.shape

    def contiguous(paged: torch.Tensor) -> torch.Tensor:
        out = paged.new_empty(batch, num_groups, cache.seq_len, head_dim)
        for b in range(batch):
            logical = paged[pages[b]].flatten(0, 1)[:cache.seq_len]  # [S, G, D]
            out[b].copy_(logical.transpose(0, 1))
        return out

    return contiguous(cache.k_cache), contiguous(cache.v_cache)


def dense_queries(queries: Queries, batch: int) -> torch.Tensor:
    """``q [B * T, H, D]`` -> contiguous ``[B, H, T, D]``."""
    total, heads, head_dim = queries.q.shape
    return queries.q.view(batch, total // batch, heads, head_dim).transpose(1, 2).contiguous()


def bottom_right_causal_mask(q_tokens: int, seq_len: int, device) -> torch.Tensor:
    """bool ``[T, S]``: query ``t`` (position ``S - T + t``) sees keys ``<= S - T + t``."""
    return torch.ones(q_tokens, seq_len, dtype=torch.bool, device=device).tril(seq_len - q_tokens)


# ----------------------------------------------------------------------------------------------
# Timing: CUDA graphs where possible
# ----------------------------------------------------------------------------------------------

def capture_graphs(fn: Callable, inputs: Sequence, steps: int = 1) -> list:
    """One CUDA graph per input set ``i``, of ``steps`` calls ``fn(x)`` on the sets ``i - steps +
    1, ..., i`` (cyclically; the last on set ``i``), after a warm-up call of each set on a side
    stream (lazy initialisation of libraries must happen outside capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x in inputs:
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graphs = []
    for i in range(len(inputs)):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for j in range(steps - 1, -1, -1):
                fn(inputs[(i - j) % len(inputs)])
        graphs.append(graph)
    torch.cuda.synchronize()
    return graphs


@dataclass
class Measured:
    """A timing, how it was taken ("cuda-graph" or "eager"), and why graphs were not used."""

    timing: Timing
    mode: str
    graph_failure: str | None = None


def measure(settings: DecodeSettings, fn: Callable, inputs: Sequence,
            after: Callable[[Callable[[int], None]], None] | None = None) -> Measured:
    """Median time of ``fn(x)`` over the rotating ``inputs``: CUDA-graph replays when the
    settings ask for graphs and capture succeeds (graphs of ``settings.steps_per_graph`` calls,
    the time divided by that count), else eager calls.

    ``after(call)``, when given, runs after the timing with ``call(i)`` running the timed form
    (graph replay or eager call) of input set ``i`` once, e.g. to check its output.
    """
    timing = settings.timing()
    failure = None
    if settings.use_graphs:
        try:
            graphs = capture_graphs(fn, inputs, settings.steps_per_graph)
        except Exception as error:  # capture unsupported by a kernel: time eager calls instead
            failure = _first_line(error)
            synchronize(settings.device)
        else:
            result = time_ms(lambda graph: graph.replay(), graphs, device=settings.device, **timing)
            result = dataclasses.replace(result, ms=result.ms / settings.steps_per_graph)
            if after is not None:
                after(lambda i: graphs[i].replay())
            del graphs
            return Measured(result, "cuda-graph")
    fn(inputs[0])  # first call (compilation, lazy initialisation) outside the estimate
    result = time_ms(fn, inputs, device=settings.device, **timing)
    if after is not None:
        after(lambda i: fn(inputs[i]))
    return Measured(result, "eager", failure)


def short_kernel_name(name: str, limit: int = 48) -> str:
    """A kernel's name without its return type, namespaces, template and call arguments:
    ``"void at::native::vectorized_elementwise_kernel<4, ...>(int, ...)"`` ->
    ``"vectorized_elementwise_kernel"``; Triton kernels keep their function names."""
    name = re.sub(r"^void ", "", name)
    name = re.split(r"[<(]", name, maxsplit=1)[0]
    return name.rsplit("::", 1)[-1][:limit]


@dataclass
class KernelBreakdown:
    """Mean device time per call of each kernel (by :func:`short_kernel_name`) of a step."""

    kernels_us: dict[str, float]
    source: str  # "cuda-graph" (graph replays profiled) or "eager" (eager calls profiled)


def _profile_kernels_us(call: Callable[[], None], calls: int) -> dict[str, float]:
    """Mean device microseconds per call of each kernel of ``call()``, over ``calls`` calls under
    ``torch.profiler`` (CUDA activity only); empty when the profiler saw no kernel."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = short_kernel_name(event.name)
            totals[name] = totals.get(name, 0.0) + event.time_range.elapsed_us()
    return {name: round(us / calls, 2) for name, us in sorted(totals.items(), key=lambda kv: -kv[1])}


def kernel_breakdown(timed: Callable[[], None], mode: str, eager: Callable[[], None],
                     calls: int = BREAKDOWN_CALLS) -> KernelBreakdown:
    """The per-kernel device times of a step: its timed form ``timed`` (a graph replay when
    ``mode`` is "cuda-graph"), or its eager call ``eager`` when the profiler sees no kernel in
    graph replays."""
    kernels = _profile_kernels_us(timed, calls)
    if kernels or mode != "cuda-graph":
        return KernelBreakdown(kernels, mode)
    return KernelBreakdown(_profile_kernels_us(eager, calls), "eager")


def bandwidth_ceiling_gbps(settings: DecodeSettings) -> float:
    """Measured memory bandwidth in GB/s over a buffer of ``settings.bandwidth_bytes``: the faster
    of a device-to-device copy (bytes read plus bytes written) and a full read (a sum), timed like
    the decode calls. A decode step mostly reads, so the read usually sets the ceiling."""
    count = max(1, settings.bandwidth_bytes // 2)
    src = torch.randn(count, device=settings.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = measure(settings, lambda _: dst.copy_(src), [None])
    del dst
    read = measure(settings, lambda _: src.sum(dtype=torch.float32), [None])
    return max(gbps(2 * count * 2, copy.timing.ms), gbps(count * 2, read.timing.ms))


# ----------------------------------------------------------------------------------------------
# MSA
# ----------------------------------------------------------------------------------------------

def msa_method(settings: DecodeSettings, q_tokens: int) -> str:
    """How the MSA step runs: "cuda-graph" (wrapper run replayed), "wrapper" (eager wrapper run)
    or "functional" (:func:`msattn.msa_paged_attention`, e.g. the reference backend)."""
    path = _path(settings, q_tokens)
    if path.attention != "triton-decode":
        return "functional"
    return "cuda-graph" if settings.use_graphs else "wrapper"


def _path(settings: DecodeSettings, q_tokens: int) -> dispatch.Path:
    """The path of the bench's paged MSA call (:func:`msattn.dispatch.paged_path`)."""
    c = settings.config
    return dispatch.paged_path(settings.backend, settings.device, page_size=c.block_size,
                               index_dim=c.index_dim, head_dim=c.head_dim, max_seqlen_q=q_tokens)


def _cache_args(cache: CacheSet, index_dtype: str) -> dict:
    index_cache, index_scale, index_block_scale = cache.index[index_dtype]
    return dict(k_cache=cache.k_cache, v_cache=cache.v_cache, index_cache=index_cache,
                block_table=cache.block_table, seq_lens=cache.seq_lens, index_scale=index_scale,
                index_block_scale=index_block_scale)


def _functional(settings: DecodeSettings, args: dict, backend: str | None = None) -> torch.Tensor:
    c = settings.config
    return msattn.msa_paged_attention(
        args["q"], args["qi"], args["k_cache"], args["v_cache"], args["index_cache"],
        args["block_table"], args["cu_seqlens_q"], args["seq_lens"], topk=c.topk,
        init_blocks=c.init_blocks, local_blocks=c.local_blocks, index_scale=args["index_scale"],
        index_block_scale=args["index_block_scale"],
        backend=settings.backend if backend is None else backend)


def _first_request(args: dict, q_tokens: int) -> dict:
    """The arguments of request 0 alone."""
    return {**args, "q": args["q"][:q_tokens], "qi": args["qi"][:q_tokens],
            "block_table": args["block_table"][:1], "seq_lens": args["seq_lens"][:1],
            "cu_seqlens_q": args["cu_seqlens_q"][:2]}


@dataclass
class MSAResult:
    measured: Measured
    method: str
    path: str
    # Largest |difference| between the timed output of request 0 of input set 0 and the
    # reference backend on the same request (None when the timed call is the functional API).
    check_max_abs_diff: float | None
    # The timed call's selection [G, total_q, topk] and output [total_q, H, D] on input set 0
    # (None when the timed call is the functional API).
    indices: torch.Tensor | None = None
    output: torch.Tensor | None = None
    breakdown: KernelBreakdown | None = None


def measure_msa(settings: DecodeSettings, caches: Sequence[CacheSet], queries: Sequence[Queries],
                index_dtype: str, *, batch: int, q_tokens: int) -> MSAResult:
    """Time one MSA decode step over the rotating (cache, queries) sets."""
    config = settings.config
    method = msa_method(settings, q_tokens)
    sets = [dict(q=x.q, qi=x.qi, cu_seqlens_q=x.cu_seqlens_q, **_cache_args(cache, index_dtype))
            for cache, x in zip(caches, queries)]
    if method == "functional":
        measured = measure(settings, partial(_functional, settings), sets)
        path = _path(settings, q_tokens)
        path = f"{path.select}/{path.attention}"
        return MSAResult(measured, method, path, None)

    wrapper = msattn.MSAPagedWrapper(
        num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
        index_dim=config.index_dim, page_size=config.block_size, topk=config.topk,
        init_blocks=config.init_blocks, local_blocks=config.local_blocks, device=settings.device,
        backend=settings.backend)
    cu_host = torch.arange(0, batch * q_tokens + 1, q_tokens, dtype=torch.int32)
    wrapper.plan(cu_host, caches[0].block_table.shape[1], dtype=settings.dtype,
                 index_dtype=INDEX_DTYPES[index_dtype])

    def run(args):
        return wrapper.run(args["q"], args["qi"], args["k_cache"], args["v_cache"],
                           args["index_cache"], args["block_table"], args["seq_lens"],
                           index_scale=args["index_scale"],
                           index_block_scale=args["index_block_scale"])

    for args in sets:  # compile and autotune outside the graphs and the timing
        run(args)
    synchronize(settings.device)
    checked = {}

    def check(call):
        """Request 0 of set 0 through the timed form (graph replay or eager run) against the
        reference backend; keeps the selection and output of set 0 (and the kernel times)."""
        call(0)
        synchronize(settings.device)
        checked["indices"], checked["output"] = wrapper.indices.clone(), wrapper.o.clone()
        timed = checked["output"][:q_tokens].float()
        expected = _functional(settings, _first_request(sets[0], q_tokens), "reference").float()
        checked["check_max_abs_diff"] = float((timed - expected).abs().max())
        checked["breakdown"] = _breakdown(settings, call, partial(run, sets[0]))

    measured = measure(settings, run, sets, after=check)
    method = "cuda-graph" if measured.mode == "cuda-graph" else "wrapper"
    return MSAResult(measured, method, "MSAPagedWrapper (triton)", **checked)


def _breakdown(settings: DecodeSettings, call: Callable[[int], None],
               eager: Callable[[], None]) -> KernelBreakdown | None:
    """:func:`kernel_breakdown` of input set 0 when the settings ask for it (CUDA only)."""
    if not (settings.breakdown and settings.device.type == "cuda"):
        return None
    return kernel_breakdown(lambda: call(0), "cuda-graph" if settings.use_graphs else "eager",
                            eager)


# ----------------------------------------------------------------------------------------------
# The peer: vLLM's decode
# ----------------------------------------------------------------------------------------------

@dataclass
class PeerResult:
    """vLLM's decode step timed beside msattn's, or why it was not (``skipped``)."""

    measured: Measured | None = None
    # Fraction of (group, token) rows of input set 0 whose selected blocks are the same set as
    # msattn's (None without msattn's selection).
    agreement: float | None = None
    # Largest |difference| between vLLM's and msattn's outputs on input set 0.
    max_abs_diff: float | None = None
    breakdown: KernelBreakdown | None = None
    skipped: str | None = None


def peer_skip_reason(settings: DecodeSettings, q_tokens_per_request: list[int]) -> str | None:
    """Why vLLM's decode is not measured for these settings (``None`` when it is)."""
    if not settings.peer:
        return "off"
    config = settings.config
    reason = vllm_peer.unsupported_reason(page_size=config.block_size, index_dim=config.index_dim,
                                          q_tokens_per_request=q_tokens_per_request,
                                          device=settings.device)
    if reason is None and not vllm_peer.available():
        reason = f"vLLM's files are not in {vllm_peer.peer_dir()}"
    return reason


def measure_peer(settings: DecodeSettings, caches: Sequence[CacheSet], queries: Sequence[Queries],
                 index_dtype: str, *, q_tokens: int, msa: MSAResult) -> PeerResult:
    """Time vLLM's decode over the same (cache, queries) sets as msattn's (converted to vLLM's
    layouts first, outside the timing) and compare its selection and output on set 0 with
    ``msa``'s; a failure to import, run or capture it is recorded in ``skipped``."""
    skipped = peer_skip_reason(settings, [q_tokens] * (queries[0].cu_seqlens_q.numel() - 1))
    if index_dtype == "nvfp4":
        skipped = "vLLM has no 4-bit index keys"
    if skipped is not None:
        return PeerResult(skipped=skipped)
    config = settings.config
    try:
        modules = vllm_peer.load()
        steps = [vllm_peer.make_peer_step(
            modules, x.q, x.qi, vllm_peer.convert_cache(**{
                k: v for k, v in _cache_args(cache, index_dtype).items()
                if k != "index_block_scale"}),
            max_seq_len=cache.seq_len, topk=config.topk, init_blocks=config.init_blocks,
            local_blocks=config.local_blocks, softmax_scale=config.head_dim ** -0.5,
            decode_query_len=q_tokens) for cache, x in zip(caches, queries)]
        result = PeerResult()

        def check(call):
            call(0)
            synchronize(settings.device)
            if msa.indices is not None:
                result.agreement = vllm_peer.selection_agreement(steps[0].topk_idx, msa.indices)
                diff = steps[0].output.float() - msa.output.float()
                result.max_abs_diff = float(diff.abs().max())
            result.breakdown = _breakdown(settings, call, steps[0].run)

        result.measured = measure(settings, lambda step: step.run(), steps, after=check)
        return result
    except Exception as error:  # vLLM's kernels failed to import, compile or run here
        synchronize(settings.device)
        return PeerResult(skipped=f"failed: {_first_line(error)}")


# ----------------------------------------------------------------------------------------------
# Dense
# ----------------------------------------------------------------------------------------------

def _sdpa(x, *, kernel: SDPBackend, gqa: bool):
    q, k, v, mask = x
    with sdpa_kernel([kernel]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _flash_causal(x, *, gqa: bool):
    """The CUDA flash kernel's own causal mode, bottom-right aligned when ``T < S``."""
    q, k, v, _ = x
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal=True)[0]


def _expanded(x, group_size: int):
    q, k, v, mask = x
    return q, k.repeat_interleave(group_size, dim=1), v.repeat_interleave(group_size, dim=1), mask


def _dense_candidates(device: torch.device, q_tokens: int) -> dict[str, Callable]:
    """Name -> ``fn(x, *, gqa)`` of every dense decode kernel to race."""
    candidates = {name: partial(_sdpa, kernel=kernel)
                  for name, kernel in DENSE_CANDIDATES[device.type].items()}
    if device.type == "cuda" and q_tokens > 1:
        candidates["flash-causal"] = _flash_causal
    return candidates


def _expansion_fits(sets: Sequence, group_size: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    extra = sum(2 * x[1].numel() * x[1].element_size() * (group_size - 1) for x in sets)
    return extra <= _EXPAND_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]


def _time_dense_candidate(settings: DecodeSettings, fn: Callable, sets: list,
                          group_size: int) -> tuple[Measured, str]:
    """Native GQA if it runs, else K/V expanded to H heads (when it fits); returns how."""
    native = partial(fn, gqa=True)
    try:
        native(sets[0])
    except Exception as native_error:
        if not _expansion_fits(sets, group_size, settings.device):
            raise RuntimeError(f"native GQA failed ({_first_line(native_error)}); K/V expanded "
                               "to H heads would not fit in memory") from native_error
        expanded = [_expanded(x, group_size) for x in sets]
        return measure(settings, partial(fn, gqa=False), expanded), "expanded-kv"
    return measure(settings, native, sets), "gqa"


@dataclass
class DecodeDense(DenseResult):
    """The dense race of one (length, batch, query tokens), with how each candidate was timed."""

    timing_modes: dict[str, str] = field(default_factory=dict)


def measure_dense_decode(settings: DecodeSettings, caches: Sequence[CacheSet], *, batch: int,
                         q_tokens_list: Sequence[int], num_sets: int) -> dict[int, DecodeDense]:
    """Race the dense candidates for every query-token count over contiguous copies of the
    first ``num_sets`` caches; returns ``{q_tokens: DecodeDense}``."""
    config, device = settings.config, settings.device
    group_size = config.num_heads // config.num_kv_heads
    kv = [dense_kv(cache) for cache in caches[:num_sets]]
    seq_len = caches[0].seq_len
    results = {}
    for q_tokens in q_tokens_list:
        mask = None if q_tokens == 1 else bottom_right_causal_mask(q_tokens, seq_len, device)
        sets = [(dense_queries(make_queries(settings, batch, q_tokens), batch), k, v, mask)
                for k, v in kv]
        result = DecodeDense()
        for name, fn in _dense_candidates(device, q_tokens).items():
            try:
                measured, how = _time_dense_candidate(settings, fn, sets, group_size)
            except Exception as error:  # unsupported here, out of memory, capture failure
                result.failures[name] = _first_line(error)
                synchronize(device)
            else:
                label = name if how == "gqa" else f"{name}+{how}"
                result.candidates_ms[label] = measured.timing.ms
                result.timing_modes[label] = measured.mode
                if measured.graph_failure:
                    result.failures[f"{label} (graph)"] = measured.graph_failure
                if result.timing is None or measured.timing.ms < result.timing.ms:
                    result.timing, result.backend = measured.timing, label
            release_memory(device)
        results[q_tokens] = result
        del sets
    del kv
    release_memory(device)
    return results


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------

def make_row(settings: DecodeSettings, *, seq_len: int, batch: int, q_tokens: int,
             index_dtype: str, msa: MSAResult, dense: DecodeDense | None, dense_status: str,
             bandwidth_gbps: float | None, input_sets: int, workload: str = "random",
             peer: PeerResult | None = None) -> dict:
    """The JSON row of one measurement (``peer``: vLLM's decode on the same inputs, when it ran
    or why not)."""
    config = settings.config
    kv_bytes = settings.dtype.itemsize
    tokens = batch * q_tokens
    msa_ms = msa.measured.timing.ms
    dense_ms = dense.timing.ms if dense is not None and dense.timing else None
    moved = msa_bytes(config, seq_len=seq_len, batch=batch, q_tokens=q_tokens,
                      index_dtype=index_dtype, kv_bytes=kv_bytes)
    moved_dense = dense_bytes(config, seq_len=seq_len, batch=batch, kv_bytes=kv_bytes)
    msa_gbps, dense_gbps = gbps(moved, msa_ms), gbps(moved_dense, dense_ms)

    def fraction(value):
        return value / bandwidth_gbps if value is not None and bandwidth_gbps else None

    peer = peer or PeerResult(skipped="not measured")
    peer_ms = peer.measured.timing.ms if peer.measured else None
    floor_us = byte_floor_us(moved, bandwidth_gbps)

    def floor_fraction(ms):
        return floor_us / (ms * 1e3) if floor_us is not None and ms else None

    def kernels(breakdown):
        return (breakdown.kernels_us, breakdown.source) if breakdown else (None, None)

    msa_kernels, msa_kernels_source = kernels(msa.breakdown)
    peer_kernels, peer_kernels_source = kernels(peer.breakdown)

    return {
        "op": settings.op,
        "seq_len": seq_len,
        "batch": batch,
        "q_tokens": q_tokens,
        "index_dtype": index_dtype,
        "workload": workload,
        "dtype": dtype_name(settings.dtype),
        "backend": settings.backend,
        "msa_path": msa.path,
        "msa_method": msa.method,
        "msa_ms": msa_ms,
        "dense_ms": dense_ms,
        "speedup": dense_ms / msa_ms if dense_ms else None,
        "dense_status": dense_status,
        "dense_backend": dense.backend if dense is not None else None,
        "dense_method": dense.timing_modes.get(dense.backend) if dense and dense.backend else None,
        "dense_candidates_ms": dense.candidates_ms if dense is not None else {},
        "dense_failures": dense.failures if dense is not None else {},
        "msa_bytes": moved,
        "dense_bytes": moved_dense,
        "msa_gbps": msa_gbps,
        "dense_gbps": dense_gbps,
        "msa_bandwidth_fraction": fraction(msa_gbps),
        "dense_bandwidth_fraction": fraction(dense_gbps),
        # The byte floor: msa_bytes at the measured bandwidth ceiling, and the share of it that
        # a step reaches (for msattn, the same number as msa_bandwidth_fraction).
        "floor_us": floor_us,
        "floor_fraction": floor_fraction(msa_ms),
        "peer_floor_fraction": floor_fraction(peer_ms),
        "peer_ms": peer_ms,
        "msa_over_peer": msa_ms / peer_ms if peer_ms else None,
        "peer_agreement": peer.agreement,
        "peer_max_abs_diff": peer.max_abs_diff,
        "peer_method": peer.measured.mode if peer.measured else None,
        "peer_graph_failure": peer.measured.graph_failure if peer.measured else None,
        "peer_skipped": peer.skipped,
        "kernels": msa_kernels,
        "kernels_source": msa_kernels_source,
        "peer_kernels": peer_kernels,
        "peer_kernels_source": peer_kernels_source,
        "tokens_per_s": tokens / (msa_ms * 1e-3),
        "ms_per_query_token": msa_ms / tokens,
        "dense_tokens_per_s": tokens / (dense_ms * 1e-3) if dense_ms else None,
        "tokens_per_s_vs_1q": None,  # filled by run() from the q_tokens = 1 row
        "msa_graph_failure": msa.measured.graph_failure,
        "check_max_abs_diff": msa.check_max_abs_diff,
        "input_sets": input_sets,
        "runs": {"msa": msa.measured.timing.runs,
                 "dense": dense.timing.runs if dense is not None and dense.timing else 0,
                 "peer": peer.measured.timing.runs if peer.measured else 0},
    }


@torch.inference_mode()
def measure_point(settings: DecodeSettings, seq_len: int, batch: int, progress: Callable[[str], None],
                  bandwidth_gbps: float | None) -> Iterator[dict]:
    """Every row of one (length, batch): dense once per query-token count, MSA (and vLLM's peer)
    per query-token count, workload and index dtype, over shared random caches."""
    device, config = settings.device, settings.config
    torch.manual_seed(settings.seed + seq_len * 131 + batch)
    l2_bytes = l2_cache_bytes(device)
    kv_bytes = settings.dtype.itemsize
    touched = min(msa_bytes(config, seq_len=seq_len, batch=batch, q_tokens=min(settings.q_tokens),
                            index_dtype=name, kv_bytes=kv_bytes) for name in settings.index_dtypes)
    num_sets = num_decode_sets(touched, l2_bytes)
    progress(f"{num_sets} random cache set(s)")
    caches = [make_cache_set(settings, seq_len, batch) for _ in range(num_sets)]

    dense_status, dense = _dense_skipped(settings, seq_len), {}
    if dense_status is None:
        progress("dense attention")
        dense_sets = num_decode_sets(dense_bytes(config, seq_len=seq_len, batch=batch,
                                                 kv_bytes=kv_bytes), l2_bytes)
        try:
            dense = measure_dense_decode(settings, caches, batch=batch,
                                         q_tokens_list=settings.q_tokens,
                                         num_sets=min(dense_sets, num_sets))
        except torch.OutOfMemoryError as error:  # the contiguous copies did not fit
            failed = DecodeDense(failures={"contiguous K/V copies": _first_line(error)})
            dense = {q_tokens: failed for q_tokens in settings.q_tokens}
            release_memory(device)

    points = [(t, w) for t in settings.q_tokens for w in settings.workloads_for(t)]
    for q_tokens, workload in points:
        queries = [make_queries(settings, batch, q_tokens, workload) for _ in caches]
        for index_dtype in settings.index_dtypes:
            progress(f"MSA q_tokens={q_tokens} {workload} index {index_dtype}")
            msa = measure_msa(settings, caches, queries, index_dtype, batch=batch, q_tokens=q_tokens)
            peer = measure_peer(settings, caches, queries, index_dtype, q_tokens=q_tokens, msa=msa)
            result = dense.get(q_tokens)
            status = dense_status or ("measured" if result and result.timing else "failed")
            yield make_row(settings, seq_len=seq_len, batch=batch, q_tokens=q_tokens,
                           index_dtype=index_dtype, msa=msa, dense=result, dense_status=status,
                           bandwidth_gbps=bandwidth_gbps, input_sets=num_sets, workload=workload,
                           peer=peer)
            del msa, peer
            release_memory(device)
    del caches
    release_memory(device)


def run(settings: DecodeSettings, progress, bandwidth_gbps: float | None) -> Iterator[dict]:
    """Measure every (length, batch) of ``settings``, yielding each row as soon as it is measured;
    ``progress`` is a :class:`msattn.bench.report.Progress`."""
    single = {}  # (seq_len, batch, index_dtype) -> tokens/s with one query token per request
    for seq_len in settings.lengths:
        for batch in settings.batches:
            progress.step(f"N={format_length(seq_len)} B={batch}")
            for row in measure_point(settings, seq_len, batch, progress, bandwidth_gbps):
                key = (seq_len, batch, row["index_dtype"])
                if row["q_tokens"] == 1:
                    single[key] = row["tokens_per_s"]
                if key in single:
                    row["tokens_per_s_vs_1q"] = row["tokens_per_s"] / single[key]
                yield row
            release_memory(settings.device)
