"""vLLM's Triton MiniMax-M3 decode and prefill as side-by-side peers of msattn's (never part of
msattn).

vLLM 0.33.0 ships the Triton kernels of its MiniMax-M3 attention in two files,
``vllm/models/minimax_m3/common/ops/index_topk.py`` and ``sparse_attn.py``. Unzipped from its
wheel into a git-ignored folder (default ``<repo>/.peers/vllm_minimax_m3``, else the folder in
``$MSATTN_PEER_DIR``) they are imported here without vLLM: :func:`load` first installs a shim for
the three modules they import (``vllm.platforms.current_platform``, ``vllm.triton_utils``,
``vllm.utils.math_utils.round_up``), unless vLLM itself is installed.

vLLM's layouts, and how msattn's paged caches map onto them (:func:`convert_cache`, once, outside
any timing):

* pages are 128 tokens (``SPARSE_BLOCK_SIZE``; one sparse block is one page), so only a
  ``page_size`` of 128 converts;
* ``kv_cache [num_pages, G, 128, 2 * D]``: K in ``[..., :D]``, V in ``[..., D:]`` (msattn: two
  caches ``[num_pages, page_size, G, D]``);
* ``index_kv_cache [num_pages, 128, Di]`` bf16/fp16 as msattn's, or float8_e4m3fn WITHOUT a
  scale (vLLM casts the keys to e4m3 and orders pages by the unscaled score): msattn's fp8 keys
  are dequantised with their per-token scales and cast back to e4m3 unscaled, so the peer scores
  the same keys to fp8 precision but does not select exactly as msattn (the agreement says how
  far);
* ``block_table [B, max_pages]`` int32 and ``seq_lens [B]`` (new tokens included) as msattn's;
* queries ``q [total_q, H, D]``, ``idx_q [total_q, G, Di]`` request-major with the SAME number of
  query tokens per request (``decode_query_len``), the last positions of each request;
* selection ``topk_idx [G, total_q, topk]`` int32: logical block ids of the request, ``-1``
  padded (msattn's ``MSAPagedWrapper.indices`` has the same shape and meaning; the order within a
  row differs, so rows are compared as sets by :func:`selection_agreement`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from msattn.bench.dense import _first_line
from msattn.bench.metrics import max_abs_diff
from msattn.bench.timing import release_memory, synchronize
from msattn.cache import FP8_DTYPE, dequantize_index_keys

PEER_DIR_ENV = "MSATTN_PEER_DIR"
DEFAULT_PEER_DIR = Path(__file__).resolve().parents[2] / ".peers" / "vllm_minimax_m3"
PEER_FILES = ("index_topk.py", "sparse_attn.py")
# vLLM's page size: one sparse block is one page.
PEER_PAGE_SIZE = 128
# Name under which the peer's files are imported (never "vllm...": no clash with a real vLLM).
_PACKAGE = "msattn_peer_vllm_minimax_m3"


def peer_dir() -> Path:
    """The folder holding vLLM's two files: ``$MSATTN_PEER_DIR``, else ``<repo>/.peers/...``."""
    return Path(os.environ.get(PEER_DIR_ENV) or DEFAULT_PEER_DIR)


def available(directory: Path | None = None) -> bool:
    """Whether both of vLLM's files are in ``directory`` (default :func:`peer_dir`)."""
    directory = peer_dir() if directory is None else Path(directory)
    return all((directory / name).is_file() for name in PEER_FILES)


# ----------------------------------------------------------------------------------------------
# The shim and the import
# ----------------------------------------------------------------------------------------------

class _ShimPlatform:
    """What the two files ask of ``vllm.platforms.current_platform``."""

    @staticmethod
    def is_cuda() -> bool:
        return torch.version.cuda is not None and torch.cuda.is_available()

    @staticmethod
    def is_rocm() -> bool:
        return False

    @classmethod
    def is_device_capability(cls, capability: tuple[int, int]) -> bool:
        return cls.is_cuda() and torch.cuda.get_device_capability() == tuple(capability)

    @classmethod
    def is_arch_support_pdl(cls) -> bool:
        """Programmatic dependent launch: CUDA on Hopper (sm_90) and later."""
        return cls.is_cuda() and torch.cuda.get_device_capability() >= (9, 0)


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def install_shim() -> None:
    """Put ``vllm``, ``vllm.platforms``, ``vllm.triton_utils``, ``vllm.utils`` and
    ``vllm.utils.math_utils`` into ``sys.modules``, with just what the two files use, unless
    vLLM is installed (its own modules then serve the imports) or a shim is already there."""
    if "vllm" in sys.modules or importlib.util.find_spec("vllm") is not None:
        return
    import triton
    import triton.language as tl

    def module(name: str, **attributes) -> types.ModuleType:
        made = types.ModuleType(name)
        made.__dict__.update(attributes)
        sys.modules[name] = made
        return made

    math_utils = module("vllm.utils.math_utils", round_up=_round_up)
    module("vllm", __path__=[], platforms=module("vllm.platforms", current_platform=_ShimPlatform()),
           triton_utils=module("vllm.triton_utils", triton=triton, tl=tl),
           utils=module("vllm.utils", __path__=[], math_utils=math_utils))


@dataclass(frozen=True)
class PeerModules:
    """vLLM's two imported files."""

    index_topk: types.ModuleType
    sparse_attn: types.ModuleType


_loaded: dict[Path, PeerModules] = {}


def load(directory: Path | None = None) -> PeerModules:
    """Import vLLM's two files from ``directory`` (default :func:`peer_dir`), once per folder."""
    directory = (peer_dir() if directory is None else Path(directory)).resolve()
    if directory not in _loaded:
        if not available(directory):
            raise FileNotFoundError(f"vLLM's {' and '.join(PEER_FILES)} are not in {directory}")
        install_shim()
        modules = {}
        for name in PEER_FILES:
            stem = name.removesuffix(".py")
            qualified = f"{_PACKAGE}_{len(_loaded)}.{stem}"
            spec = importlib.util.spec_from_file_location(qualified, directory / name)
            modules[stem] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[stem])
        _loaded[directory] = PeerModules(**modules)
    return _loaded[directory]


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------

def unsupported_reason(*, page_size: int, index_dim: int, q_tokens_per_request: list[int],
                       device: torch.device) -> str | None:
    """Why vLLM's decode cannot run this step (``None`` when it can)."""
    if device.type != "cuda":
        return "needs CUDA"
    if page_size != PEER_PAGE_SIZE:
        return f"vLLM's pages are {PEER_PAGE_SIZE} tokens, not {page_size}"
    if index_dim & (index_dim - 1):
        return f"vLLM's indexer needs a power-of-two index dim, not {index_dim}"
    if len(set(q_tokens_per_request)) != 1:
        return "vLLM's decode needs the same number of query tokens in every request"
    return None


@dataclass
class PeerCache:
    """msattn's paged caches in vLLM's layouts (see the module doc)."""

    kv_cache: torch.Tensor  # [num_pages, G, 128, 2 * D], K then V
    index_cache: torch.Tensor  # [num_pages, 128, Di] bf16/fp16, or float8_e4m3fn unscaled
    block_table: torch.Tensor  # int32 [B, max_pages], -1 padded
    seq_lens: torch.Tensor  # int32 [B]


def convert_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, index_cache: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor,
                  index_scale: torch.Tensor | None = None) -> PeerCache:
    """vLLM's layouts of msattn's caches: ``k_cache, v_cache [num_pages, page_size, G, D]``,
    ``index_cache [num_pages, page_size, Di]`` (fp8 with float32 ``index_scale [num_pages,
    page_size]``: dequantised, then cast to e4m3 without a scale, as vLLM stores keys). The block
    table and lengths are shared, not copied. Written without a temporary of the K/V size."""
    num_pages, page_size, groups, head_dim = k_cache.shape
    kv_cache = k_cache.new_empty(num_pages, groups, page_size, 2 * head_dim)
    kv_cache[..., :head_dim].copy_(k_cache.transpose(1, 2))
    kv_cache[..., head_dim:].copy_(v_cache.transpose(1, 2))
    if index_cache.dtype == FP8_DTYPE:
        index_cache = dequantize_index_keys(index_cache, index_scale).to(FP8_DTYPE)
    return PeerCache(kv_cache=kv_cache, index_cache=index_cache.contiguous(),
                     block_table=block_table, seq_lens=seq_lens)


def selection_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows of two selections ``[G, total_q, topk]`` (block ids, ``-1`` padded)
    holding the same set of blocks."""
    same = (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1)
    return float(same.float().mean())


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------

@dataclass
class PeerStep:
    """vLLM's decode step (or prefill) over fixed inputs: ``run()`` writes ``topk_idx`` and
    ``output``."""

    run: Callable[[], None]
    topk_idx: torch.Tensor  # int32 [G, total_q, topk]: the selection, logical block ids
    output: torch.Tensor  # [total_q, H, D] in q's dtype


def make_peer_step(modules: PeerModules, q: torch.Tensor, qi: torch.Tensor, cache: PeerCache, *,
                   max_seq_len: int, topk: int, init_blocks: int, local_blocks: int,
                   softmax_scale: float, decode_query_len: int) -> PeerStep:
    """vLLM's decode of ``q [total_q, H, D]``, ``qi [total_q, G, Di]`` (``decode_query_len``
    tokens per request, request-major) against ``cache`` whose longest request holds
    ``max_seq_len`` tokens (vLLM's ``max_seq_len`` metadata): ``minimax_m3_index_decode`` (block
    scores, partial top-k, top-k merge) then ``minimax_m3_sparse_attn_decode`` (split over the
    selected blocks, then a merge), as vLLM's engine calls them. The score buffer, the selection
    and the output are allocated here; vLLM's wrappers allocate their partial top-k and partial
    attention workspaces in each call (from the graph's own pool when captured), and read no
    device value on the host, so ``run`` can be captured in a CUDA graph."""
    total_q, heads, head_dim = q.shape
    groups = qi.shape[1]
    max_blocks = -(-max_seq_len // PEER_PAGE_SIZE)
    score = torch.empty(groups, total_q, _round_up(max_blocks, 16), dtype=torch.float32,
                        device=q.device)
    topk_idx = torch.empty(groups, total_q, topk, dtype=torch.int32, device=q.device)
    output = torch.empty(total_q, heads, head_dim, dtype=q.dtype, device=q.device)

    def run() -> None:
        modules.index_topk.minimax_m3_index_decode(
            qi, cache.index_cache, cache.block_table, cache.seq_lens, max_seq_len, topk,
            init_blocks, local_blocks, groups, decode_query_len, decode_query_len, out=topk_idx,
            score_out=score)
        modules.sparse_attn.minimax_m3_sparse_attn_decode(
            q, cache.kv_cache, topk_idx, cache.block_table, cache.seq_lens, groups, softmax_scale,
            output, decode_query_len)

    return PeerStep(run=run, topk_idx=topk_idx, output=output)


# ----------------------------------------------------------------------------------------------
# The prefill
# ----------------------------------------------------------------------------------------------

# vLLM runs a long prefill in chunks of this many query tokens (its score buffer is [G, chunk,
# blocks] float32: 2 GiB a chunk at 1M keys).
PEER_PREFILL_CHUNK = 16384


def contiguous_cache(k: torch.Tensor, v: torch.Tensor, ki: torch.Tensor) -> PeerCache:
    """One sequence's contiguous ``k, v [N, G, D]`` and ``ki [N, Di]`` (``N`` a multiple of
    :data:`PEER_PAGE_SIZE`) as a vLLM cache of ``N / 128`` pages in order."""
    length, groups, head_dim = k.shape
    if length % PEER_PAGE_SIZE:
        raise ValueError(f"the sequence must fill whole {PEER_PAGE_SIZE}-token pages, got {length}")
    pages = length // PEER_PAGE_SIZE
    table = torch.arange(pages, dtype=torch.int32, device=k.device)[None]
    seq_lens = torch.tensor([length], dtype=torch.int32, device=k.device)
    shape = (pages, PEER_PAGE_SIZE, groups, head_dim)
    return convert_cache(k.view(shape), v.view(shape), ki.view(pages, PEER_PAGE_SIZE, -1), table,
                         seq_lens)


def _peer_chunk(modules: PeerModules, q, qi, cache: PeerCache, topk_idx, output, cu_seqlens_q,
                seq_lens, prefix_lens, *, max_query_len: int, max_seq_len: int, topk: int,
                init_blocks: int, local_blocks: int, softmax_scale: float) -> None:
    """One call of vLLM's prefill path over a batch of query runs (request ``b``'s queries are
    the ``len_q(b)`` positions after ``prefix_lens[b]``; ``seq_lens[b]`` keys are visible):
    ``minimax_m3_index_score`` (every visible block's max score), ``minimax_m3_index_topk``,
    ``minimax_m3_sparse_attn``; writes ``topk_idx`` and ``output``."""
    groups = qi.shape[1]
    score = modules.index_topk.minimax_m3_index_score(
        qi, cache.index_cache, cache.block_table, cu_seqlens_q, seq_lens, prefix_lens,
        max_query_len, max_seq_len, groups)
    modules.index_topk.minimax_m3_index_topk(score, cu_seqlens_q, prefix_lens, max_query_len, topk,
                                             init_blocks, local_blocks, out=topk_idx)
    modules.sparse_attn.minimax_m3_sparse_attn(
        q, cache.kv_cache, topk_idx, cache.block_table, cu_seqlens_q, seq_lens, prefix_lens,
        max_query_len, groups, softmax_scale, output)


def make_peer_prefill(modules: PeerModules, q: torch.Tensor, qi: torch.Tensor, cache: PeerCache, *,
                      topk: int, init_blocks: int, local_blocks: int, softmax_scale: float,
                      chunk: int = PEER_PREFILL_CHUNK) -> PeerStep:
    """vLLM's prefill of one sequence ``q [N, H, D]``, ``qi [N, G, Di]`` whose ``N`` keys are all
    in ``cache`` (request 0, :func:`contiguous_cache`), in chunks of ``chunk`` query tokens as its
    engine runs it (:func:`_peer_chunk` per chunk, over the prefix before it and its own keys).
    The per-chunk metadata is built here, outside ``run``."""
    total, heads, head_dim = q.shape
    device = q.device
    topk_idx = torch.empty(qi.shape[1], total, topk, dtype=torch.int32, device=device)
    output = torch.empty(total, heads, head_dim, dtype=q.dtype, device=device)
    options = dict(topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
                   softmax_scale=softmax_scale)
    chunks = []
    for start in range(0, total, chunk):
        end = min(total, start + chunk)
        chunks.append((start, end,
                       torch.tensor([0, end - start], dtype=torch.int32, device=device),
                       torch.tensor([end], dtype=torch.int32, device=device),
                       torch.tensor([start], dtype=torch.int32, device=device)))

    def run() -> None:
        for start, end, cu_seqlens_q, seq_lens, prefix_lens in chunks:
            _peer_chunk(modules, q[start:end], qi[start:end], cache, topk_idx[:, start:end],
                        output[start:end], cu_seqlens_q, seq_lens, prefix_lens,
                        max_query_len=end - start, max_seq_len=end, **options)

    return PeerStep(run=run, topk_idx=topk_idx, output=output)


def time_peer(make_steps: Callable[[], list[PeerStep]], measure: Callable, device: torch.device,
              msa_result: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Time vLLM's steps (``make_steps()``: one per input set, built outside the timing) with
    ``measure(fn, steps)``, after comparing set 0's selection and output with msattn's
    (``msa_result()``: ``(indices [G, total_q, topk], output [total_q, H, D])``). Returns the
    row fields ``peer_ms``, ``peer_agreement``, ``peer_max_abs_diff`` and ``peer_skipped`` (a
    failure to import, compile or run vLLM's kernels is recorded there, not raised)."""
    try:
        steps = make_steps()
        steps[0].run()
        indices, output = msa_result()
        agreement = selection_agreement(steps[0].topk_idx, indices)
        diff = max_abs_diff(steps[0].output, output)
        del indices, output  # 16 GiB at 1M: vLLM's prefill needs the room
        release_memory(device)
        timing = measure(lambda step: step.run(), steps)
        return {"peer_ms": timing.ms, "peer_agreement": agreement, "peer_max_abs_diff": diff,
                "peer_skipped": None}
    except Exception as error:  # vLLM's kernels failed to import, compile or run here
        synchronize(device)
        return {"peer_ms": None, "peer_skipped": f"failed: {_first_line(error)}"}


def make_peer_chunked(modules: PeerModules, q: torch.Tensor, qi: torch.Tensor, cache: PeerCache,
                      cu_seqlens_q: torch.Tensor, *, max_query_len: int, max_seq_len: int,
                      topk: int, init_blocks: int, local_blocks: int,
                      softmax_scale: float) -> PeerStep:
    """vLLM's chunked prefill of a batch: request ``b``'s ``len_q(b)`` new tokens (``q [total_q,
    H, D]``, ``qi [total_q, G, Di]``, ``cu_seqlens_q [B + 1]``) are the last of its
    ``cache.seq_lens[b]`` cached keys; one :func:`_peer_chunk` call (query runs of at most 16K
    tokens, as vLLM's engine schedules them)."""
    prefix_lens = (cache.seq_lens - (cu_seqlens_q[1:] - cu_seqlens_q[:-1])).to(torch.int32)
    topk_idx = torch.empty(qi.shape[1], q.shape[0], topk, dtype=torch.int32, device=q.device)
    output = torch.empty_like(q)

    def run() -> None:
        _peer_chunk(modules, q, qi, cache, topk_idx, output, cu_seqlens_q, cache.seq_lens,
                    prefix_lens, max_query_len=max_query_len, max_seq_len=max_seq_len, topk=topk,
                    init_blocks=init_blocks, local_blocks=local_blocks,
                    softmax_scale=softmax_scale)

    return PeerStep(run=run, topk_idx=topk_idx, output=output)
