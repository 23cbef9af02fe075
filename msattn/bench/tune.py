"""Kernel profiles and launch-configuration sweeps (GPU only).

    python3 -m msattn.bench.tune profile --lengths 128k,1m        # CUDA time of every kernel
    python3 -m msattn.bench.tune attention --length 128k          # sparse-attention configs
    python3 -m msattn.bench.tune indexer --length 256k            # indexer configs
    python3 -m msattn.bench.tune decode --shapes 1x1x64k,4x16x128k  # decode: selection designs
    python3 -m msattn.bench.tune backward --length 128k           # sparse-attention backward configs
    python3 -m msattn.bench.tune train --lengths 32k,128k         # CUDA time of every kernel of a step
    python3 -m msattn.bench.tune loss --length 128k               # indexer-loss configs (fwd + bwd)
    python3 -m msattn.bench.tune prefill-designs --lengths 16k    # KV-outer vs query-outer attention
    python3 -m msattn.bench.tune chunked --chunk-shapes 1x512x16k # a chunked-prefill call's kernels

M3 shape (H=64, G=4, D=Di=128, block 128, top-16), batch 1, bf16, random inputs (decode: one
query token against a random paged cache, bf16 and fp8 index keys, CUDA-graph replays of
``MSAPagedWrapper.run``). Every swept configuration is checked against the default one on the
same inputs (selections equal, outputs within bf16 rounding) before it is timed. Results print
as lines and go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

import msattn
from msattn.bench import decode, metrics
from msattn.bench.cli import parse_chunk_shapes, parse_length, parse_lengths
from msattn.bench.prefill import PrefillSettings, make_inputs
from msattn.bench.report import environment, output_stem, write_json
from msattn.bench.timing import release_memory, time_ms
from msattn.config import MSAConfig
from msattn.ops import indexer, sparse_attention

CONFIG = MSAConfig()


def _settings(length: int) -> PrefillSettings:
    return PrefillSettings(op="tune", device=torch.device("cuda"), config=CONFIG, lengths=(length,),
                           batch=1, dtype=torch.bfloat16, backend="triton", warmup=2, repeats=10,
                           time_budget_s=3.0, dense=False, dense_max_len=None)


def _select(x, config=None):
    return indexer.select_blocks(x.qi, x.ki, x.cu_seqlens, x.cu_seqlens, **CONFIG.selection_kwargs(),
                                 config=config)


def _attend(x, config=None, chunk_rows=None):
    return sparse_attention.sparse_attention(
        x.q, x.k, x.v, x.indices, x.cu_seqlens, x.cu_seqlens, block_size=CONFIG.block_size,
        softmax_scale=CONFIG.head_dim ** -0.5, config=config, chunk_rows=chunk_rows)


def _inputs(length: int):
    x = make_inputs(_settings(length), length)
    x.indices = _select(x)
    return x


def _time(fn, x) -> float:
    settings = _settings(0)
    fn(x)
    return time_ms(fn, [x], device=x.q.device, **settings.timing()).ms


def _kernel_times(prof, divisor: float, *, name_chars: int, digits: int) -> dict:
    """CUDA time of each kernel in a finished ``torch.profiler`` run, in microseconds / divisor."""
    kernels = {}
    for event in prof.key_averages():
        cuda_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if cuda_us > 0:
            kernels[event.key[:name_chars]] = round(cuda_us / divisor, digits)
    return kernels


def profile(lengths, out: list) -> None:
    """CUDA time per kernel of one msa_select and one sparse-attention call at each length."""
    for length in lengths:
        x = _inputs(length)
        _attend(x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            _select(x)
            _attend(x)
            torch.cuda.synchronize()
        kernels = _kernel_times(prof, 1e3, name_chars=90, digits=3)  # ms
        kernels = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:25])
        print(f"profile {length}: total {sum(kernels.values()):.1f} ms", flush=True)
        for name, ms in kernels.items():
            print(f"  {ms:10.3f} ms  {name}", flush=True)
        c = CONFIG
        host = _host_profile(lambda: msattn.msa_attention(
            x.q, x.k, x.v, x.qi, x.ki, cu_seqlens_q=x.cu_seqlens, cu_seqlens_k=x.cu_seqlens,
            max_seqlen_q=length, max_seqlen_k=length, backend="triton", **c.selection_kwargs()),
            calls=5)
        print("  msa_attention host (cProfile, us a call, cumulative):", flush=True)
        for us, function in host:
            print(f"  {us:10.1f} us  {function}", flush=True)
        out.append({"kind": "profile", "seq_len": length, "kernels_ms": kernels,
                    "msa_attention_host_us": host})
        del x
        release_memory(torch.device("cuda"))


def profile_train(lengths, out: list) -> None:
    """CUDA time per kernel of one training step of the attention (``msattn.bench.train``:
    selection, sparse forward and backward, indexer loss forward and backward)."""
    from msattn.bench import train

    for length in lengths:
        settings = train.TrainSettings(
            op="train", device=torch.device("cuda"), config=CONFIG, lengths=(length,), batch=1,
            dtype=torch.bfloat16, backend="triton", warmup=1, repeats=1, time_budget_s=1.0,
            dense=False, dense_max_len=None)
        x = train.make_inputs(settings, length)
        train.msa_step(settings, length, x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            train.msa_step(settings, length, x)
            torch.cuda.synchronize()
        kernels = _kernel_times(prof, 1e3, name_chars=90, digits=3)  # ms
        kernels = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:30])
        print(f"train profile {length}: total {sum(kernels.values()):.1f} ms", flush=True)
        for name, ms in kernels.items():
            print(f"  {ms:10.3f} ms  {name}", flush=True)
        out.append({"kind": "train-profile", "seq_len": length, "kernels_ms": kernels})
        del x
        release_memory(torch.device("cuda"))


def _host_profile(fn, calls: int = 20, top: int = 30) -> list:
    """Where the host time of ``fn()`` goes: cProfile over ``calls`` calls (the GPU synchronised
    after each), the ``top`` functions by cumulative time, as ``[us per call, function]``."""
    import cProfile
    import pstats

    fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
        torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = sorted(((cum / calls * 1e6, f"{'/'.join(path.split('/')[-2:])}:{line}:{name}")
                   for (path, line, name), (_, _, _, cum, _) in stats.items()), reverse=True)
    return [[round(us, 1), name] for us, name in rows[:top]]


# Chunk selections: the default rule, the fused kernel always, the block-score + top-k kernels
# wherever the fused kernel would split the keys (indexer.BLOCK_TOPK_MAX_SCORE_BYTES).
CHUNK_SELECTIONS = {"default": None, "fused": 0, "block-topk": 1 << 40}


def profile_chunked(shapes, out: list, selections=("default",)) -> None:
    """One ``msa_paged_attention`` chunked-prefill call (:mod:`msattn.bench.chunked`) per shape
    and selection rule (:data:`CHUNK_SELECTIONS`), on the same inputs: its eager time (host work
    included), the CUDA time of each of its kernels, the number of device activities (kernels,
    memsets and copies), the host profile, and the output's largest difference from the first
    rule's."""
    from msattn.bench import chunked

    settings = chunked.ChunkedSettings(op="prefill-chunked", device=torch.device("cuda"),
                                       config=CONFIG, shapes=tuple(shapes), dtype=torch.bfloat16,
                                       backend="triton", warmup=3, repeats=20, time_budget_s=2.0)
    default_bytes = indexer.BLOCK_TOPK_MAX_SCORE_BYTES
    for shape in shapes:
        x = chunked.make_inputs(settings, shape)
        call = functools.partial(chunked._msa, settings, shape[1])
        first_o = None
        for selection in selections:
            budget = CHUNK_SELECTIONS[selection]
            indexer.BLOCK_TOPK_MAX_SCORE_BYTES = default_bytes if budget is None else budget
            try:
                row = _profile_chunk(call, x, chunked.shape_name(shape), selection)
                o = call(x)
            finally:
                indexer.BLOCK_TOPK_MAX_SCORE_BYTES = default_bytes
            if first_o is None:
                first_o = o
            else:
                row["max_abs_diff_vs_" + selections[0]] = metrics.max_abs_diff(o, first_o)
            print(json.dumps({k: v for k, v in row.items() if k not in ("kernels_ms", "host_us")}),
                  flush=True)
            out.append(row)
        del x, first_o, o
        release_memory(torch.device("cuda"))


def _profile_chunk(call, x, name: str, selection: str) -> dict:
    eager_ms = _time(call, x)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call(x)
        torch.cuda.synchronize()
    kernels = _kernel_times(prof, 1e3, name_chars=90, digits=4)  # ms
    launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"chunked {name} ({selection} selection): eager {eager_ms:.3f} ms, kernels "
          f"{sum(kernels.values()):.3f} ms in {launches} launches", flush=True)
    for kernel, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {ms:10.4f} ms  {kernel}", flush=True)
    host = _host_profile(lambda: call(x))
    print("  host (cProfile, us a call, cumulative):", flush=True)
    for us, function in host:
        print(f"  {us:10.1f} us  {function}", flush=True)
    return {"kind": "chunked-profile", "shape": name, "selection": selection, "eager_ms": eager_ms,
            "launches": launches, "kernels_ms": kernels, "host_us": host}


def sweep_attention(length: int, configs: list, chunk_rows_list, out: list) -> None:
    x = _inputs(length)
    flops = metrics.sparse_attention_flops(CONFIG, length)
    expected, _ = _attend(x)
    for config, chunk_rows in itertools.product(configs, chunk_rows_list):
        row = {"kind": "attention", "seq_len": length, "config": dataclasses.asdict(config),
               "chunk_rows": chunk_rows}
        try:
            got, _ = _attend(x, config, chunk_rows)
            row["max_abs_diff"] = metrics.max_abs_diff(got, expected)
            del got
            row["ms"] = _time(lambda y: _attend(y, config, chunk_rows), x)
            row["tflops"] = metrics.tflops(flops, row["ms"])
        except Exception as error:  # a config that does not compile or fit is reported, not fatal
            row["error"] = str(error).splitlines()[0][:200]
        print(json.dumps(row), flush=True)
        out.append(row)
        release_memory(torch.device("cuda"))


def sweep_prefill_designs(lengths, out: list) -> None:
    """Sparse attention of a prefill two ways at each length: the KV-outer kernel (partials and a
    combine) and the query-outer decode kernel (one program per token and group, online softmax,
    no partials) over the same K/V viewed as 128-key pages, with several launch configs."""
    from msattn.ops import paged_attention as pa

    for length in lengths:
        x = _inputs(length)
        flops = metrics.sparse_attention_flops(CONFIG, length)
        expected, expected_lse = _attend(x)
        row = {"kind": "prefill-design", "seq_len": length, "design": "kv-outer",
               "ms": _time(lambda y: _attend(y), x)}
        row["tflops"] = metrics.tflops(flops, row["ms"])
        print(json.dumps(row), flush=True)
        out.append(row)
        page = CONFIG.block_size
        pages = length // page
        k_pages = x.k.view(pages, page, *x.k.shape[1:])
        v_pages = x.v.view(pages, page, *x.v.shape[1:])
        table = torch.arange(pages, dtype=torch.int32, device=x.q.device)[None]
        seq_lens = x.cu_seqlens[1:] - x.cu_seqlens[:-1]
        num_heads, head_dim = x.q.shape[1:]
        for config in (pa.UNSPLIT_CONFIG, pa.PagedAttentionConfig(num_warps=8),
                       pa.PagedAttentionConfig(block_n=64), pa.PagedAttentionConfig(num_stages=3),
                       pa.PagedAttentionConfig(tokens_per_program=2, num_warps=8),
                       pa.PagedAttentionConfig(tokens_per_program=4, num_warps=8)):
            row = {"kind": "prefill-design", "seq_len": length, "design": "query-outer",
                   "config": dataclasses.asdict(config)}
            try:
                plan = pa.plan_paged_attention(length, 1, length, num_heads, k_pages.shape[2],
                                               head_dim, CONFIG.topk, x.q.dtype, x.q.device,
                                               split=False, config=config)
                o = torch.full_like(x.q, float("nan"))
                lse = torch.full_like(expected_lse, float("nan"))

                def run(y):
                    return pa.run_paged_attention(plan, y.q, k_pages, v_pages, y.indices, table,
                                                  y.cu_seqlens, seq_lens,
                                                  softmax_scale=head_dim ** -0.5, out=(o, lse))
                run(x)
                row["o_max_abs_diff"] = float((o.float() - expected.float()).abs().max())
                row["lse_max_abs_diff"] = float((lse - expected_lse).abs().max())
                row["ms"] = _time(run, x)
                row["tflops"] = metrics.tflops(flops, row["ms"])
            except Exception as error:  # a config that does not compile or fit is reported
                row["error"] = str(error).splitlines()[0][:200]
            print(json.dumps(row), flush=True)
            out.append(row)
        del x
        release_memory(torch.device("cuda"))


def sweep_indexer(length: int, configs: list, out: list, *, fp8: bool = False) -> None:
    """The fused indexer with each launch configuration (``fp8``: on the fp8 index path, rows
    differing from its default configuration's selection)."""
    x = _inputs(length)
    flops = metrics.indexer_flops(CONFIG, length)

    def select(y, config):
        if not fp8:
            return _select(y, config)
        return indexer.select_blocks_fp8(y.qi, y.ki, y.cu_seqlens, y.cu_seqlens,
                                         **CONFIG.selection_kwargs(), config=config)

    expected = (select(x, configs[0]) if fp8 else x.indices).sort(-1).values
    for config in configs:
        row = {"kind": "indexer", "seq_len": length, "index_dtype": "fp8" if fp8 else "bf16",
               "config": dataclasses.asdict(config)}
        try:
            got = select(x, config).sort(-1).values
            row["rows_differing"] = int((got != expected).any(-1).sum())
            row["ms"] = _time(lambda y: select(y, config), x)
            row["tflops"] = metrics.tflops(flops, row["ms"])
        except Exception as error:
            row["error"] = str(error).splitlines()[0][:200]
        print(json.dumps(row), flush=True)
        out.append(row)


def sweep_backward(length: int, configs: list, out: list) -> None:
    """The sparse-attention backward with each launch configuration: time, useful TFLOP/s, peak
    memory above the inputs, and the largest gradient difference from the first configuration."""
    from msattn.bench.train import attended_pairs, sparse_bwd_flops
    from msattn.ops import sparse_attention_bwd as bwd

    x = _inputs(length)
    flops = sparse_bwd_flops(CONFIG, attended_pairs(x.indices, x.cu_seqlens, x.cu_seqlens,
                                                    CONFIG.block_size))
    o, lse = _attend(x)
    do = torch.randn_like(o)
    scale = CONFIG.head_dim ** -0.5

    def run(y, config):
        return bwd.sparse_attention_backward(do, y.q, y.k, y.v, o, lse, y.indices, y.cu_seqlens,
                                             y.cu_seqlens, block_size=CONFIG.block_size,
                                             softmax_scale=scale, config=config)

    expected = None
    for config in configs:
        row = {"kind": "backward", "seq_len": length, "config": dataclasses.asdict(config)}
        try:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            grads = run(x, config)
            torch.cuda.synchronize()
            row["extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
            if expected is None:
                expected = grads
            row["max_abs_diff"] = [metrics.max_abs_diff(g, e) for g, e in zip(grads, expected)]
            del grads
            row["ms"] = _time(lambda y: run(y, config), x)
            row["tflops"] = metrics.tflops(flops, row["ms"])  # useful: the official MSA model
        except Exception as error:  # a config that does not compile or fit is reported, not fatal
            row["error"] = str(error).splitlines()[0][:200]
        print(json.dumps(row), flush=True)
        out.append(row)
        release_memory(torch.device("cuda"))


def sweep_loss(length: int, configs: list, out: list) -> None:
    """The indexer loss (forward with gradients, then backward) with each launch configuration:
    time, and the differences of the loss and the gradients from the first configuration."""
    from msattn.ops import indexer_loss as loss_ops

    x = _inputs(length)
    _, lse = _attend(x)
    qi, ki = x.qi.detach().requires_grad_(), x.ki.detach().requires_grad_()

    def run(y, config):
        loss = loss_ops.indexer_loss(y.q, y.k, qi, ki, y.indices, y.cu_seqlens, y.cu_seqlens,
                                     block_size=CONFIG.block_size,
                                     softmax_scale=CONFIG.head_dim ** -0.5, lse=lse, config=config)
        return (loss,) + torch.autograd.grad(loss, (qi, ki))

    expected = None
    for config in configs:
        row = {"kind": "indexer-loss", "seq_len": length, "config": dataclasses.asdict(config)}
        try:
            got = run(x, config)
            if expected is None:
                expected = got
            row["max_abs_diff"] = [metrics.max_abs_diff(g, e) for g, e in zip(got, expected)]
            del got
            row["ms"] = _time(lambda y: run(y, config), x)
        except Exception as error:  # a config that does not compile or fit is reported, not fatal
            row["error"] = str(error).splitlines()[0][:200]
        print(json.dumps(row), flush=True)
        out.append(row)
        release_memory(torch.device("cuda"))


def _loss_configs() -> list:
    from msattn.ops.indexer_loss import CUDA_CONFIG as default

    variants = [dict(block_e=128, tiles_per_program=2), dict(block_e=32, tiles_per_program=8),
                dict(tiles_per_program=8), dict(tiles_per_program=2), dict(backward_warps=4),
                dict(backward_stages=2), dict(block_e=128, tiles_per_program=2, backward_warps=4),
                dict(block_e=128, tiles_per_program=4)]
    return [default] + [dataclasses.replace(default, **v) for v in variants]


def _decode_settings(length: int, batch: int = 1, q_tokens: int = 1,
                     index_dtypes=("bf16",)) -> decode.DecodeSettings:
    """Decode settings of one shape; its cache sets hold the index keys in ``index_dtypes``
    (names of :data:`decode.INDEX_DTYPES`)."""
    return decode.DecodeSettings(
        op="tune-decode", device=torch.device("cuda"), config=CONFIG, lengths=(length,),
        batches=(batch,), q_tokens=(q_tokens,), index_dtypes=tuple(index_dtypes),
        dtype=torch.bfloat16, backend="triton", graphs=True, warmup=10, repeats=200,
        time_budget_s=0.5, dense=False, dense_max_len=None, bandwidth_bytes=1 << 31)


# Decode formats of `tune decode --index-dtypes`: an index-key format of decode.INDEX_DTYPES, or
# one of these with fp8 K/V caches (per-head scales): name -> index-key format.
FP8_KV_FORMATS = {"fp8-kv": "bf16", "fp8+fp8-kv": "fp8"}


def _decode_step(wrapper, cache, queries, index_dtype):
    if index_dtype in FP8_KV_FORMATS:
        from msattn.cache import quantize_kv

        (k_cache, k_scale), (v_cache, v_scale) = quantize_kv(cache.k_cache), quantize_kv(cache.v_cache)
        index_cache, index_scale, _ = cache.index[FP8_KV_FORMATS[index_dtype]]
        return lambda _: wrapper.run(queries.q, queries.qi, k_cache, v_cache, index_cache,
                                     cache.block_table, cache.seq_lens, index_scale=index_scale,
                                     k_scale=k_scale, v_scale=v_scale)
    index_cache, index_scale, index_block_scale = cache.index[index_dtype]
    return lambda _: wrapper.run(queries.q, queries.qi, cache.k_cache, cache.v_cache, index_cache,
                                 cache.block_table, cache.seq_lens, index_scale=index_scale,
                                 index_block_scale=index_block_scale)


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"BxTxL"``: requests x query tokens per request x context length (e.g. ``4x16x128k``)."""
    batch, q_tokens, length = text.lower().split("x")
    return int(batch), int(q_tokens), parse_length(length)


def _selection_configs(rows_per_sequence: int) -> list:
    """The decode selections raced: the fused indexer (split keys merged in the same launch)
    and the block-score + top-k kernels with their launch variants."""
    block_topk = indexer.PageTopkConfig()
    variants = [dict(segment=512), dict(score_stages=3), dict(score_stages=4),
                dict(score_warps=8), dict(programs_per_sm=8, batched_programs_per_sm=4),
                dict(programs_per_sm=8), dict(programs_per_sm=16), dict(block_n=64),
                dict(block_n=64, programs_per_sm=8), dict(programs_per_sm=8, score_warps=8)]
    return [("fused", indexer.launch_config(rows_per_sequence, is_cuda=True)),
            ("block-topk", block_topk),
            *((f"block-topk {v}", dataclasses.replace(block_topk, **v)) for v in variants),
            ("block-topk, attention without PDL", block_topk, dict(pdl=False)),
            ("block-topk, attention unsplit", block_topk, dict(split=False)),
            ("block-topk, attention split", block_topk, dict(split=True)),
            *((f"block-topk, attention {c}", block_topk, dict(config=c)) for c in _attention_configs())]


def _attention_configs() -> list:
    """Decode-attention launch variants (the default is the plan's own)."""
    from msattn.ops.paged_attention import PagedAttentionConfig

    return [PagedAttentionConfig(block_n=n, num_warps=w, num_stages=s)
            for n, w, s in ((128, 8, 2), (128, 4, 3), (64, 4, 3), (64, 8, 3))] + [
        PagedAttentionConfig(block_n=n, num_warps=w, num_stages=s, tokens_per_program=t)
        for t in (2, 4, 8) for n, w, s in ((128, 4, 2), (128, 8, 2), (64, 8, 3))]


def sweep_decode(shapes, out: list, *, profile_only: bool = False, attention_only: bool = False,
                 index_dtypes=("bf16", "fp8", "nvfp4", "fp8-kv"), workloads=("random",)) -> None:
    """Per shape (requests x tokens x context), query workload and index dtype: the CUDA time of
    each kernel of one decode step and the graph-replayed step time, for each selection design and
    launch configuration (the first is the baseline the others' selections are compared with);
    ``attention_only``: the default selection with each decode-attention launch variant."""
    settings = _decode_settings(0)
    bandwidth = decode.bandwidth_ceiling_gbps(settings)
    # The harness's own floor: graphs of one tiny kernel per step, timed as the steps are
    # (settings.steps_per_graph steps per graph).
    tiny = torch.zeros(1, device="cuda")
    floor_us = decode.measure(settings, lambda _: tiny.add_(1), [None]).timing.ms * 1e3
    print(f"bandwidth ceiling {bandwidth:.0f} GB/s; one-kernel graph {floor_us:.2f} us", flush=True)
    out.append({"kind": "bandwidth", "gbps": bandwidth, "one_kernel_graph_us": round(floor_us, 2)})
    for batch, q_tokens, length in shapes:
        # the cache's index keys: bf16 and every other format asked for
        key_formats = ["bf16"] + sorted({FP8_KV_FORMATS.get(d, d) for d in index_dtypes} - {"bf16"})
        settings = _decode_settings(length, batch, q_tokens, key_formats)
        cache = decode.make_cache_set(settings, length, batch)
        configs = _selection_configs(q_tokens * CONFIG.num_kv_heads)
        if profile_only:
            configs = configs[:2]
        elif attention_only:
            configs = [c for c in configs if c[0] == "block-topk" or "attention" in c[0]]
        for workload, index_dtype in itertools.product(workloads if q_tokens > 1 else ("random",),
                                                       index_dtypes):
            queries = decode.make_queries(settings, batch, q_tokens, workload)
            key_format = FP8_KV_FORMATS.get(index_dtype, index_dtype)
            fp8_kv = index_dtype in FP8_KV_FORMATS
            step_bytes = decode.msa_bytes(CONFIG, seq_len=length, batch=batch, q_tokens=q_tokens,
                                          index_dtype=key_format, kv_bytes=1 if fp8_kv else 2)
            wrapper = msattn.MSAPagedWrapper(
                num_heads=CONFIG.num_heads, num_kv_heads=CONFIG.num_kv_heads,
                head_dim=CONFIG.head_dim, index_dim=CONFIG.index_dim, page_size=CONFIG.block_size)
            expected = None
            for name, config, *attention in configs:
                row = {"kind": "decode", "batch": batch, "q_tokens": q_tokens, "seq_len": length,
                       "workload": workload, "index_dtype": index_dtype, "selection": name,
                       "config": dataclasses.asdict(config)}
                try:
                    if index_dtype == "nvfp4" and not isinstance(config, indexer.PageTopkConfig):
                        continue  # only the decode selection reads 4-bit keys
                    wrapper.plan(queries.cu_seqlens_q.cpu(), cache.block_table.shape[1],
                                 index_dtype=decode.INDEX_DTYPES[key_format],
                                 kv_dtype=torch.float8_e4m3fn if fp8_kv else None,
                                 selection_config=config)
                    if attention:  # the same attention with other launch choices
                        wrapper.attention_plan = _replan_attention(wrapper, **attention[0])
                    step = _decode_step(wrapper, cache, queries, index_dtype)
                    step(None)
                    torch.cuda.synchronize()
                    got = wrapper.indices.sort(-1).values.clone(), wrapper.o.float().clone()
                    if expected is None:
                        expected = got
                    row["rows_differing"] = int((got[0] != expected[0]).any(-1).sum())
                    # the attention of the same selection: equal up to accumulation order
                    row["o_max_abs_diff"] = float((got[1] - expected[1]).abs().max())
                    row["timeline_us"] = _timeline_us(step)
                    row["us"] = round(decode.measure(settings, step, [None]).timing.ms * 1e3, 2)
                    row["gbps"] = round(step_bytes / (row["us"] * 1e3), 1)
                    row["bandwidth_fraction"] = round(row["gbps"] / bandwidth, 3)
                except Exception as error:  # a config that does not compile or fit is reported
                    row["error"] = str(error).splitlines()[0][:200]
                print(json.dumps(row), flush=True)
                out.append(row)
        del cache
        release_memory(torch.device("cuda"))


def _replan_attention(wrapper, *, pdl: bool | None = None, split: bool | None = None,
                      config=None):
    """The wrapper's attention plan launched without PDL (``pdl=False``), planned with the
    slots split or not (``split``), or with another launch configuration (``config``)."""
    from msattn.ops import paged_attention

    plan = wrapper.attention_plan
    if split is not None or config is not None:  # planned as plan() would (split, workspaces)
        plan = paged_attention.plan_paged_attention(
            plan.total_q, plan.batch, plan.max_len_q, plan.num_heads, plan.num_groups,
            plan.head_dim, plan.topk, wrapper.o.dtype, wrapper.device, split=split, config=config)
    return plan if pdl is None else dataclasses.replace(plan, pdl=pdl)


def _timeline_us(step, calls: int = 20) -> dict:
    """The critical path of one step: the median start and end of each of its kernels, in
    microseconds after its first kernel starts, over ``calls`` replays of a CUDA graph of the
    step, one at a time. (Kernels chained with programmatic dependent launch start before their
    predecessor ends and wait in it, so their own durations overlap; the ends do not.)"""
    graph = decode.capture_graphs(step, [None])[0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            graph.replay()
            torch.cuda.synchronize()
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    per_step = len(kernels) // calls
    if per_step == 0:
        return {}
    timeline = {}
    for j in range(per_step):
        steps = [kernels[i * per_step:(i + 1) * per_step] for i in range(calls)]
        starts = [s[j][0] - s[0][0] for s in steps]
        ends = [s[j][1] - s[0][0] for s in steps]
        timeline[f"{j}:{steps[0][j][2][:40]}"] = [round(statistics.median(starts), 2),
                                                  round(statistics.median(ends), 2)]
    return timeline


ATTENTION_CONFIGS = [sparse_attention.CUDA_CONFIG] + [
    dataclasses.replace(sparse_attention.CUDA_CONFIG, **variant) for variant in (
        dict(num_stages=2),
        dict(tiles_per_program=8), dict(tiles_per_program=32),
        dict(block_m=128, num_warps=8, tiles_per_program=8),
        dict(block_m=128, num_warps=8, num_stages=2, tiles_per_program=8),
        dict(block_m=128, num_warps=4, tiles_per_program=8), dict(num_warps=8))]


def _backward_configs() -> list:
    from msattn.ops.sparse_attention_bwd import CUDA_CONFIG as default

    # Rows per program (block_m x tiles_per_program) set how often a split bucket adds its dK/dV
    # tile into float32 with atomics (at 128K a bucket holds ~32K rows on average); the atomic
    # dQ's chunks of rows set how many float32 dQ rows the concurrent programs add into.
    variants = [dict(tiles_per_program=32), dict(tiles_per_program=128), dict(num_stages=3),
                dict(atomic_dq_max_bytes=4 << 30),  # one buffer up to 128K
                dict(atomic_dq_max_bytes=1 << 28, atomic_dq_chunk_bytes=1 << 28),
                dict(dq_mode="query")]
    return [default] + [dataclasses.replace(default, **v) for v in variants]


INDEXER_CONFIGS = [indexer.IndexerConfig(block_r=r, num_warps=w, num_stages=st)
                   for r, w, st in ((256, 16, 2), (256, 16, 3), (512, 16, 2), (128, 8, 3),
                                    (256, 8, 2), (512, 16, 3))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m msattn.bench.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("profile", "attention", "indexer", "decode", "backward",
                                         "train", "loss", "prefill-designs", "chunked"))
    parser.add_argument("--lengths", type=parse_lengths, default=(128 << 10,))
    parser.add_argument("--length", type=parse_length, default=128 << 10)
    parser.add_argument("--chunk-rows", default="0", help="comma-separated; 0 = the default")
    parser.add_argument("--default-config", action="store_true",
                        help="attention: sweep only --chunk-rows with the tuned launch config")
    parser.add_argument("--shapes", type=lambda t: [parse_shape(x) for x in t.split(",")],
                        default=[(1, 1, 64 << 10), (1, 1, 1 << 20)],
                        help="decode: requests x tokens x context, e.g. 1x1x64k,4x16x128k")
    parser.add_argument("--chunk-shapes", type=parse_chunk_shapes,
                        default=parse_chunk_shapes("1x512x16k,1x2kx64k,1x16kx1m"),
                        help="chunked: requests x chunk x prefix, e.g. 1x512x16k,4x2kx64k")
    parser.add_argument("--selections", default="default",
                        help="chunked: selection rules, some of " + ",".join(CHUNK_SELECTIONS))
    parser.add_argument("--index-dtypes", default="bf16,fp8,nvfp4,fp8-kv",
                        help="decode: index-key formats (fp8-kv: bf16 keys with fp8 K/V caches; "
                             "fp8+fp8-kv: fp8 keys with fp8 K/V caches)")
    parser.add_argument("--profile-only", action="store_true",
                        help="decode: the two selection designs' defaults only; backward: the "
                             "default launch with each way of accumulating dQ only")
    parser.add_argument("--attention-only", action="store_true",
                        help="decode: the default selection with each attention launch variant")
    parser.add_argument("--workloads", default="random",
                        help="decode: query workloads of multi-token shapes, some of "
                             "random,correlated")
    parser.add_argument("--fp8-index", action="store_true",
                        help="indexer: sweep the fp8 index path (fp8 keys and queries)")
    parser.add_argument("--variants", type=json.loads, default=None,
                        help="backward, attention: a JSON list of BackwardConfig or "
                             "AttentionConfig fields to replace in the default, one launch each "
                             "after the default, e.g. "
                             "'[{\"atomic_dq_chunk_bytes\": 2147483648}]'")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/local"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("msattn.bench.tune needs a CUDA GPU", file=sys.stderr)
        return 2
    rows: list = []
    if args.what == "profile":
        profile(args.lengths, rows)
    elif args.what == "train":
        profile_train(args.lengths, rows)
    elif args.what == "decode":
        sweep_decode(args.shapes, rows, profile_only=args.profile_only,
                     attention_only=args.attention_only,
                     index_dtypes=tuple(args.index_dtypes.split(",")),
                     workloads=tuple(args.workloads.split(",")))
    elif args.what == "backward":
        configs = _backward_configs()
        if args.variants is not None:
            configs = [configs[0]] + [dataclasses.replace(configs[0], **v) for v in args.variants]
        elif args.profile_only:  # the default, all rows at once, chunks of 0.5 GiB, query-outer dQ
            configs = [configs[0], dataclasses.replace(configs[0], atomic_dq_max_bytes=1 << 40),
                       dataclasses.replace(configs[0], atomic_dq_chunk_bytes=1 << 29),
                       dataclasses.replace(configs[0], dq_mode="query")]
        sweep_backward(args.length, configs, rows)
    elif args.what == "chunked":
        profile_chunked(args.chunk_shapes, rows, tuple(args.selections.split(",")))
    elif args.what == "prefill-designs":
        sweep_prefill_designs(args.lengths, rows)
    elif args.what == "loss":
        sweep_loss(args.length, _loss_configs(), rows)
    elif args.what == "attention":
        chunks = [int(c) or None for c in args.chunk_rows.split(",")]
        configs = [sparse_attention.CUDA_CONFIG] if args.default_config else ATTENTION_CONFIGS
        if args.variants is not None:
            configs = [configs[0]] + [dataclasses.replace(configs[0], **v) for v in args.variants]
        sweep_attention(args.length, configs, chunks, rows)
    else:
        sweep_indexer(args.length, INDEXER_CONFIGS, rows, fp8=args.fp8_index)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cuda"))
    write_json(args.out / f"{output_stem('tune-' + args.what, env)}.json",
               {**env, "command": sys.argv, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
