"""The transformers benchmark: an M3-shaped ``MiniMaxM3VLForCausalLM`` (random weights), prefill and
``generate()``, transformers' own attention (``"sdpa"``) against ``"msattn"``.

The model is built from a ``MiniMaxM3VLTextConfig`` with M3's attention (hidden size 6144, 64
query heads, 4 KV heads, head dim 128, partial rotary 64 of 128, index branch 4 x 128, block 128,
top-16, one local block) in a few layers: layer 0 full attention, the others MSA
(``minimax_m3_sparse``), with dense MLPs of a tiny width and a small vocabulary, so that the
attention dominates. Random weights (transformers' initialisation), one model for both
implementations (``set_attn_implementation``), batch 1.

- prefill: ``model(ids, use_cache=False, logits_to_keep=1)`` on random token ids; on CUDA also
  the median time of one MSA layer's attention module (``self_attn``: projections, norms,
  rotary, index branch, selection and attention) inside those calls (:class:`LayerClock`);
- generate: ``model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)`` (the
  default ``DynamicCache``), timed for ``n = new_tokens`` and ``n = 1``; the decode rate is
  ``(new_tokens - 1) / (t(new_tokens) - t(1))``.

Times are medians by :func:`msattn.bench.timing.time_ms` after a warm-up call; peak memory is
``max_memory_allocated()`` during one call (the weights included) and that peak minus what was
allocated before the call; for "msattn" prefill also ``attention_extra_gib``, its peak minus the
peak of the same call with an attention function that computes nothing (:func:`floor_peak_gib`).
A call that runs out of memory (``torch.OutOfMemoryError``) gives a
row with ``"status": "oom"``; the memory is released before the next one. Any other error gives
``"status": "error"`` with its first line.

transformers' "sdpa" path builds, in every sparse layer, the index scores ``[B, G, T, S]`` in fp32
and a dense additive mask ``[B, H, T, S]``, so it runs out of memory at long contexts; "msattn"
runs the fused selection and the sparse kernels.
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, Iterator

import torch

from msattn.bench.dense import _first_line
from msattn.bench.report import dtype_name, format_length, grid_lines, number_cell
from msattn.bench.timing import Timing, release_memory, synchronize, time_ms
from msattn.config import MSAConfig

GIB = 1 << 30
IMPLS = ("sdpa", "msattn")


@dataclass(frozen=True)
class HFSettings:
    """Everything one transformers run depends on."""

    op: str  # the rows' "op": "hf" or "hf-cpu"
    device: torch.device
    config: MSAConfig  # the attention shape and selection
    lengths: tuple[int, ...]  # prefill lengths
    gen_lengths: tuple[int, ...]  # prompt lengths of generate()
    new_tokens: int
    hidden_size: int
    num_layers: int  # layer 0 full attention, the others MSA
    vocab_size: int
    mlp_size: int
    dtype: torch.dtype
    backend: str  # msattn backend of the "msattn" implementation
    warmup: int
    repeats: int
    time_budget_s: float
    impls: tuple[str, ...] = IMPLS
    seed: int = 0

    def to_dict(self) -> dict:
        """JSON-ready copy."""
        return {**asdict(self), "device": str(self.device), "dtype": dtype_name(self.dtype),
                "lengths": list(self.lengths), "gen_lengths": list(self.gen_lengths),
                "impls": list(self.impls)}

    def timing(self) -> dict:
        return {"warmup": self.warmup, "repeats": self.repeats, "budget_s": self.time_budget_s}


def text_config(settings: HFSettings):
    """The ``MiniMaxM3VLTextConfig`` of ``settings``."""
    from transformers import MiniMaxM3VLTextConfig

    c = settings.config
    if c.init_blocks:
        raise ValueError("transformers' MiniMax-M3 has no init (attention-sink) blocks: "
                         "--init-blocks must be 0")
    if settings.num_layers < 2:
        raise ValueError("the model needs at least 2 layers (one full-attention layer, then MSA)")
    layers = settings.num_layers
    return MiniMaxM3VLTextConfig(
        vocab_size=settings.vocab_size, hidden_size=settings.hidden_size,
        intermediate_size=settings.mlp_size, dense_intermediate_size=settings.mlp_size,
        shared_intermediate_size=settings.mlp_size, num_hidden_layers=layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, index_n_heads=c.num_kv_heads, index_head_dim=c.index_dim,
        index_block_size=c.block_size, index_topk_blocks=c.topk,
        index_local_blocks=c.local_blocks, num_local_experts=2, num_experts_per_tok=1,
        layer_types=["full_attention"] + ["minimax_m3_sparse"] * (layers - 1),
        mlp_layer_types=["dense"] * layers,
        max_position_embeddings=max((*settings.lengths, *settings.gen_lengths)) + settings.new_tokens,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5})


def build_model(settings: HFSettings):
    """The random-weight model on the device, in ``settings.dtype``, in eval mode."""
    from transformers import MiniMaxM3VLForCausalLM

    torch.manual_seed(settings.seed)
    with torch.device(settings.device):
        model = MiniMaxM3VLForCausalLM(text_config(settings))
    return model.to(settings.dtype).eval()


def _ids(settings: HFSettings, seq_len: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(settings.seed + seq_len)
    ids = torch.randint(3, settings.vocab_size, (1, seq_len), generator=gen)
    return ids.to(settings.device)


def _prefill(model, ids):
    return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


def _generate(model, ids, *, new_tokens: int):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected "
                           f"{new_tokens}")
    return out


@dataclass
class Measured:
    status: str  # "ok", "oom" or "error"
    timing: Timing | None = None
    peak_gib: float | None = None
    extra_gib: float | None = None
    error: str | None = None


def measure_call(settings: HFSettings, fn: Callable[[], object]) -> Measured:
    """Warm-up call, one call for the peak memory (CUDA), then the timed calls; out of memory and
    other errors are caught and the memory released."""
    device = settings.device
    result = None
    try:
        fn()
        synchronize(device)
        peak = extra = None
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            peak, extra = peak / GIB, (peak - before) / GIB
        timing = time_ms(lambda _: fn(), [None], device=device, **settings.timing())
        result = Measured("ok", timing, peak, extra)
    except torch.OutOfMemoryError as error:
        result = Measured("oom", error=_first_line(error))
    except Exception as error:  # noqa: BLE001 - recorded in the row, the run goes on
        result = Measured("error", error=f"{type(error).__name__}: {_first_line(error)}")
    # the traceback (and the tensors its frames held) is gone once the except block ends
    gc.collect()
    release_memory(device)
    return result


def _row(settings: HFSettings, mode: str, seq_len: int, impl: str, m: Measured) -> dict:
    return {"op": settings.op, "mode": mode, "seq_len": seq_len, "batch": 1, "impl": impl,
            "dtype": dtype_name(settings.dtype),
            "backend": settings.backend if impl == "msattn" else None, "status": m.status,
            "ms": m.timing.ms if m.timing else None, "peak_gib": m.peak_gib,
            "extra_gib": m.extra_gib, "runs": m.timing.runs if m.timing else 0,
            "error": m.error, "speedup": None}


def _set_impl(model, impl: str) -> None:
    model.set_attn_implementation(impl)


class LayerClock:
    """Times every forward of the models' attention modules (``self_attn`` of each decoder layer)
    with CUDA events recorded by forward hooks, split into the full-attention layer and the MSA
    layers; used inside whole-model calls, so each layer runs exactly as in the model."""

    def __init__(self, model):
        self.device = next(model.parameters()).device
        self.pending: dict[str, list] = {"full": [], "sparse": []}
        self.handles = []
        if self.device.type != "cuda":
            return
        for layer in model.model.layers:
            attn = layer.self_attn
            kind = "sparse" if getattr(attn, "indexer", None) is not None else "full"
            self.handles.append(attn.register_forward_pre_hook(partial(self._start, kind)))
            self.handles.append(attn.register_forward_hook(partial(self._end, kind)))

    def _start(self, kind, module, args):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.pending[kind].append([event, None])

    def _end(self, kind, module, args, output):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.pending[kind][-1][1] = event

    def median_ms(self, kind: str) -> float | None:
        """Median time of one forward of a layer of ``kind`` ("full" or "sparse"), or None."""
        synchronize(self.device)
        times = [a.elapsed_time(b) for a, b in self.pending[kind] if b is not None]
        return statistics.median(times) if times else None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _no_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function that computes nothing: a zero ``[B, Tq, H, D]`` output (finite, so
    the layers after it route and compute as usual)."""
    batch, heads, length, head_dim = query.shape
    return query.new_zeros(batch, length, heads, head_dim), None


def floor_peak_gib(settings: HFSettings, model, ids) -> float | None:
    """Peak memory (GiB, CUDA) of one prefill with "msattn" whose attention function computes
    nothing: the model, its activations and the index queries and keys, without any attention
    workspace. ``peak_gib`` of the "msattn" row minus this is what msattn's attention adds."""
    from transformers import AttentionInterface

    import msattn.integrations.transformers as msattn_tf

    if settings.device.type != "cuda":
        return None
    _set_impl(model, msattn_tf.NAME)
    AttentionInterface.register(msattn_tf.NAME, _no_attention)
    try:
        with torch.inference_mode():
            _prefill(model, ids)
            synchronize(settings.device)
            torch.cuda.reset_peak_memory_stats(settings.device)
            _prefill(model, ids)
            synchronize(settings.device)
            return torch.cuda.max_memory_allocated(settings.device) / GIB
    except Exception:  # noqa: BLE001 - out of memory or another failure: no floor
        return None
    finally:
        AttentionInterface.register(msattn_tf.NAME, msattn_tf.attention_forward)
        gc.collect()
        release_memory(settings.device)


def prefill_rows(settings: HFSettings, model, seq_len: int, progress) -> list[dict]:
    ids = _ids(settings, seq_len)
    rows = {}
    for impl in settings.impls:
        progress(f"prefill {impl}")
        _set_impl(model, impl)
        clock = LayerClock(model)
        try:
            with torch.inference_mode():
                m = measure_call(settings, partial(_prefill, model, ids))
            ok = m.status == "ok"
            layer_ms = {kind: clock.median_ms(kind) if ok else None for kind in ("full", "sparse")}
        finally:
            clock.close()
        row = _row(settings, "prefill", seq_len, impl, m)
        row["tokens_per_s"] = seq_len / (m.timing.ms / 1e3) if m.timing else None
        row.update({"sparse_layer_ms": layer_ms["sparse"], "full_layer_ms": layer_ms["full"],
                    "sparse_layer_speedup": None})
        rows[impl] = row
    _speedups(rows, ("ms", "speedup"), ("sparse_layer_ms", "sparse_layer_speedup"))
    if "msattn" in rows and rows["msattn"]["status"] == "ok":
        progress("prefill without attention (memory floor)")
        floor = floor_peak_gib(settings, model, ids)
        ours = rows["msattn"]["peak_gib"]
        rows["msattn"]["floor_peak_gib"] = floor
        rows["msattn"]["attention_extra_gib"] = ours - floor if ours is not None and floor is not None else None
    return list(rows.values())


def generate_rows(settings: HFSettings, model, seq_len: int, progress) -> list[dict]:
    ids = _ids(settings, seq_len)
    n = settings.new_tokens
    rows = {}
    for impl in settings.impls:
        _set_impl(model, impl)
        with torch.inference_mode():
            progress(f"generate {impl}, {n} new tokens")
            m = measure_call(settings, partial(_generate, model, ids, new_tokens=n))
            one = None
            if m.status == "ok" and n > 1:
                progress(f"generate {impl}, 1 new token")
                one = measure_call(settings, partial(_generate, model, ids, new_tokens=1))
        row = _row(settings, "generate", seq_len, impl, m)
        decode_ms = None
        if one is not None and one.status == "ok" and m.timing.ms > one.timing.ms:
            decode_ms = (m.timing.ms - one.timing.ms) / (n - 1)
        row.update({"new_tokens": n, "generate_1_ms": one.timing.ms if one and one.timing else None,
                    "generate_1_status": one.status if one else None,
                    "decode_ms_per_token": decode_ms,
                    "tokens_per_s": 1e3 / decode_ms if decode_ms else None,
                    "e2e_tokens_per_s": n / (m.timing.ms / 1e3) if m.timing else None,
                    "decode_speedup": None})
        rows[impl] = row
    _speedups(rows, ("ms", "speedup"), ("decode_ms_per_token", "decode_speedup"))
    return list(rows.values())


def _speedups(rows: dict, *pairs) -> None:
    """On the "msattn" row: ``sdpa value / msattn value`` for each ``(value key, speedup key)``
    where both ran."""
    if "sdpa" not in rows or "msattn" not in rows:
        return
    for key, speedup in pairs:
        ours, theirs = rows["msattn"].get(key), rows["sdpa"].get(key)
        if ours and theirs:
            rows["msattn"][speedup] = theirs / ours


def run(settings: HFSettings, progress, model=None) -> Iterator[dict]:
    """Every prefill length, then every generate length; yields each row as soon as both
    implementations of its point are measured. ``progress`` is a
    :class:`msattn.bench.report.Progress` (one step for the model, then one per point)."""
    import msattn.integrations.transformers as msattn_tf

    msattn_tf.register(backend=settings.backend)
    if model is None:
        progress.step("model")
        progress("build")
        model = build_model(settings)
    for seq_len in settings.lengths:
        progress.step(f"prefill N={format_length(seq_len)}")
        yield from prefill_rows(settings, model, seq_len, progress)
    for seq_len in settings.gen_lengths:
        progress.step(f"generate N={format_length(seq_len)}")
        yield from generate_rows(settings, model, seq_len, progress)


def weights_gib(settings: HFSettings) -> float:
    """Parameter bytes of the model of ``settings`` (computed from the config, no model built)."""
    c, h, layers = settings.config, settings.hidden_size, settings.num_layers
    attention = h * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * h
    indexer = h * (c.num_kv_heads + 1) * c.index_dim
    mlp = 3 * h * settings.mlp_size
    params = (layers * (attention + mlp) + (layers - 1) * indexer
              + 2 * settings.vocab_size * h)
    return params * torch.tensor([], dtype=settings.dtype).element_size() / GIB


def header(env: dict, settings: HFSettings) -> str:
    c = settings.config
    return (f"MiniMaxM3VLForCausalLM {settings.op} on {env['device']} (transformers "
            f"{env.get('transformers')}): {settings.num_layers} layers (layer 0 full attention, "
            f"{settings.num_layers - 1} MSA), hidden {settings.hidden_size}, H={c.num_heads} "
            f"G={c.num_kv_heads} D={c.head_dim} Di={c.index_dim}, block {c.block_size}, "
            f"top-{c.topk}, dense MLP {settings.mlp_size}, vocab {settings.vocab_size}, "
            f"{dtype_name(settings.dtype)}, random weights (~{weights_gib(settings):.2f} GiB), "
            f"batch 1; {' vs '.join(settings.impls)} (msattn backend {settings.backend})")


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------

def _ms(row: dict) -> str:
    return number_cell("ms", ",.1f")(row) if row["status"] == "ok" else row["status"]


CELLS: dict[str, Callable[[dict], str]] = {
    "mode": lambda row: row["mode"],
    "length": lambda row: format_length(row["seq_len"]),
    "impl": lambda row: row["impl"],
    "ms": _ms,
    "tokens/s": number_cell("tokens_per_s", ",.0f"),
    "ms/token": number_cell("decode_ms_per_token", ".2f"),
    "peak GiB": number_cell("peak_gib", ".2f"),
    "attention GiB": number_cell("attention_extra_gib", ".2f"),
    "speedup": number_cell("speedup", ".3g", suffix="x"),
    "MSA layer ms": number_cell("sparse_layer_ms", ",.2f"),
    "layer speedup": number_cell("sparse_layer_speedup", ".3g", suffix="x"),
    "decode speedup": number_cell("decode_speedup", ".3g", suffix="x"),
}
COLUMNS = tuple(CELLS)


def format_table(rows, columns=COLUMNS) -> str:
    """Right-aligned text table; a note under it for every row that failed."""
    lines = grid_lines(rows, columns, CELLS)
    lines += [f"{row['mode']} {format_length(row['seq_len'])} {row['impl']}: {row['status']}: "
              f"{row['error']}" for row in rows if row["status"] != "ok"]
    lines.append("prefill tokens/s: prompt tokens per second; generate tokens/s and ms/token: the "
                 "decode steps ((t(n) - t(1)) / (n - 1)); speedups: sdpa / msattn where both ran; "
                 "attention GiB: msattn's prefill peak minus the same prefill with an attention "
                 "that computes nothing (the model, activations and index keys)")
    return "\n".join(lines)
