"""The chunked-prefill benchmark: a chunk of new tokens per request against a paged cache that
already holds its prefix, through the paged API (``msa_paged_attention``: the paged selection,
then the KV-outer attention over pages), beside vLLM's Triton prefill where it can run.

A shape is ``requests x chunk x prefix``: every request has ``prefix + chunk`` cached tokens
(random K/V and index keys, 128-token pages handed out in a random order), of which the last
``chunk`` are the new query tokens. One row per shape (``op`` ``prefill-chunked``): ``msa_ms``
(the whole call: selection and attention), ``peer_ms`` (vLLM's score, top-k and attention on the
same caches, converted to its layouts outside the timing), ``msa_over_peer``, ``peer_agreement``
(rows of the selection with the same set of blocks) and ``peer_max_abs_diff`` (outputs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, Iterator

import torch

import msattn
from msattn.bench import peer as vllm_peer
from msattn.bench.report import dtype_name, format_length, number_cell
from msattn.bench.timing import add_input_sets, l2_cache_bytes, release_memory, time_ms
from msattn.config import MSAConfig


@dataclass(frozen=True)
class ChunkedSettings:
    """Everything one chunked-prefill run depends on."""

    op: str
    device: torch.device
    config: MSAConfig
    shapes: tuple[tuple[int, int, int], ...]  # (requests, chunk, prefix)
    dtype: torch.dtype
    backend: str
    warmup: int
    repeats: int
    time_budget_s: float
    peer: bool = False
    seed: int = 0

    @property
    def lengths(self) -> tuple[int, ...]:  # one progress step per shape
        return tuple(prefix + chunk for _, chunk, prefix in self.shapes)

    def to_dict(self) -> dict:
        return {**asdict(self), "device": str(self.device), "dtype": dtype_name(self.dtype),
                "shapes": [list(shape) for shape in self.shapes]}

    def timing(self) -> dict:
        return {"warmup": self.warmup, "repeats": self.repeats, "budget_s": self.time_budget_s}


def shape_name(shape: tuple[int, int, int]) -> str:
    requests, chunk, prefix = shape
    return f"{requests}x{format_length(chunk)}x{format_length(prefix)}"


@dataclass
class ChunkInputs:
    """The new tokens of every request and the paged caches that hold them after the prefix."""

    q: torch.Tensor  # [requests * chunk, H, D]
    qi: torch.Tensor  # [requests * chunk, G, Di]
    k_cache: torch.Tensor  # [num_pages, page_size, G, D]
    v_cache: torch.Tensor
    index_cache: torch.Tensor  # [num_pages, page_size, Di]
    block_table: torch.Tensor  # int32 [requests, pages per request]
    cu_seqlens_q: torch.Tensor  # int32 [requests + 1]
    seq_lens: torch.Tensor  # int32 [requests]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


def make_inputs(settings: ChunkedSettings, shape: tuple[int, int, int]) -> ChunkInputs:
    """Random (never zero) queries and caches of one shape."""
    config, device = settings.config, settings.device
    requests, chunk, prefix = shape
    page = config.block_size
    pages = -(-(prefix + chunk) // page)
    rand = partial(torch.randn, device=device, dtype=settings.dtype)
    order = torch.randperm(requests * pages, device=device).view(requests, pages)
    return ChunkInputs(
        q=rand(requests * chunk, config.num_heads, config.head_dim),
        qi=rand(requests * chunk, config.num_kv_heads, config.index_dim),
        k_cache=rand(requests * pages, page, config.num_kv_heads, config.head_dim),
        v_cache=rand(requests * pages, page, config.num_kv_heads, config.head_dim),
        index_cache=rand(requests * pages, page, config.index_dim),
        block_table=order.to(torch.int32),
        cu_seqlens_q=torch.arange(0, requests * chunk + 1, chunk, dtype=torch.int32, device=device),
        seq_lens=torch.full((requests,), prefix + chunk, dtype=torch.int32, device=device))


def _msa(settings: ChunkedSettings, chunk: int, x: ChunkInputs) -> torch.Tensor:
    c = settings.config
    return msattn.msa_paged_attention(
        x.q, x.qi, x.k_cache, x.v_cache, x.index_cache, x.block_table, x.cu_seqlens_q, x.seq_lens,
        topk=c.topk, init_blocks=c.init_blocks, local_blocks=c.local_blocks, max_seqlen_q=chunk,
        backend=settings.backend)


def peer_skip_reason(settings: ChunkedSettings, chunk: int) -> str | None:
    """Why vLLM's chunked prefill is not timed beside msattn's (``None`` when it is)."""
    if not settings.peer:
        return "off"
    config = settings.config
    reason = vllm_peer.unsupported_reason(page_size=config.block_size, index_dim=config.index_dim,
                                          q_tokens_per_request=[chunk], device=settings.device)
    if reason is None and chunk > vllm_peer.PEER_PREFILL_CHUNK:
        reason = f"vLLM schedules at most {vllm_peer.PEER_PREFILL_CHUNK} query tokens a call"
    if reason is None and not vllm_peer.available():
        reason = f"vLLM's files are not in {vllm_peer.peer_dir()}"
    return reason


def measure_peer(settings: ChunkedSettings, shape, sets: list, measure: Callable) -> dict:
    """vLLM's chunked prefill over the same sets; its agreement and output difference on set 0
    (:func:`msattn.bench.peer.time_peer`)."""
    requests, chunk, prefix = shape
    skipped = peer_skip_reason(settings, chunk)
    if skipped is not None:
        return {"peer_ms": None, "peer_skipped": skipped}
    config = settings.config

    def steps():
        modules = vllm_peer.load()
        return [vllm_peer.make_peer_chunked(
            modules, x.q, x.qi,
            vllm_peer.convert_cache(x.k_cache, x.v_cache, x.index_cache, x.block_table, x.seq_lens),
            x.cu_seqlens_q, max_query_len=chunk, max_seq_len=prefix + chunk, topk=config.topk,
            init_blocks=config.init_blocks, local_blocks=config.local_blocks,
            softmax_scale=config.head_dim ** -0.5) for x in sets]

    def msa_result():
        x = sets[0]
        indices = msattn.msa_paged_select(x.qi, x.index_cache, x.block_table, x.cu_seqlens_q,
                                          x.seq_lens, topk=config.topk,
                                          init_blocks=config.init_blocks,
                                          local_blocks=config.local_blocks, max_seqlen_q=chunk,
                                          backend=settings.backend)
        return indices, _msa(settings, chunk, x)

    return vllm_peer.time_peer(steps, measure, settings.device, msa_result)


@torch.inference_mode()
def measure_shape(settings: ChunkedSettings, shape, progress: Callable[[str], None]) -> dict:
    """Measure one shape; returns the JSON row."""
    requests, chunk, prefix = shape
    torch.manual_seed(settings.seed + requests * 7 + chunk + prefix)
    measure = partial(time_ms, device=settings.device, **settings.timing())
    sets = [make_inputs(settings, shape)]
    add_input_sets(sets, partial(make_inputs, settings, shape), l2_cache_bytes(settings.device),
                   sets[0].nbytes)
    progress("msa_paged_attention")
    msa = measure(partial(_msa, settings, chunk), sets)
    if settings.peer:
        progress("vLLM's prefill")
    peer = measure_peer(settings, shape, sets, measure)
    del sets
    release_memory(settings.device)
    return {"op": settings.op, "shape": shape_name(shape), "requests": requests, "chunk": chunk,
            "prefix": prefix, "seq_len": prefix + chunk, "dtype": dtype_name(settings.dtype),
            "backend": settings.backend, "msa_ms": msa.ms, **peer,
            "msa_over_peer": msa.ms / peer["peer_ms"] if peer.get("peer_ms") else None,
            "tokens_per_s": requests * chunk / (msa.ms / 1e3), "speedup": None,
            "runs": msa.runs}


def run(settings: ChunkedSettings, progress) -> Iterator[dict]:
    """Every shape in turn, each row as soon as it is measured."""
    for shape in settings.shapes:
        progress.step(shape_name(shape))
        yield measure_shape(settings, shape, progress)


def header(env: dict, settings: ChunkedSettings) -> str:
    c = settings.config
    return (f"MSA chunked prefill on {env['device']}: msa_paged_attention (backend "
            f"{settings.backend}), {dtype_name(settings.dtype)}, H={c.num_heads} "
            f"G={c.num_kv_heads} D={c.head_dim} Di={c.index_dim}, page = block {c.block_size}, "
            f"top-{c.topk}; shapes are requests x chunk x prefix")


CELLS: dict[str, Callable[[dict], str]] = {
    "shape": lambda row: row["shape"],
    "MSA ms": number_cell("msa_ms", ",.3f"),
    "tokens/s": number_cell("tokens_per_s", ",.0f"),
    "vLLM ms": number_cell("peer_ms", ",.3f"),
    "MSA / vLLM": number_cell("msa_over_peer", ".3g"),
    "same sets": number_cell("peer_agreement", ".1%"),
}
COLUMNS = tuple(CELLS)
