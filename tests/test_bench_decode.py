"""The decode benchmark (msattn.bench.decode and the decode suites of the CLI): byte model, inputs,
dense baseline, parsing, and tiny end-to-end runs on the CPU."""

from __future__ import annotations

import argparse
import importlib.util
import json

from dataclasses import replace

import pytest
import torch

from msattn import reference
from msattn.bench import cli, decode, report
from msattn.cache import dequantize_index_keys, gather_paged
from msattn.config import MSAConfig
from msattn.ops.nvfp4 import quantize_nvfp4

HAS_PAGED = importlib.util.find_spec("msattn.paged") is not None
needs_paged = pytest.mark.skipif(not HAS_PAGED, reason="msattn.paged (the paged API) is missing")

TINY_CONFIG = MSAConfig(num_heads=4, num_kv_heads=2, num_index_heads=2, head_dim=16, index_dim=16,
                        block_size=16, topk=3)
TINY = ["--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--index-dim", "16",
        "--block-size", "16", "--topk", "3", "--warmup", "1", "--repeats", "2"]

ROW_KEYS = {"op", "seq_len", "batch", "q_tokens", "index_dtype", "msa_ms", "dense_ms", "speedup",
            "dense_backend", "dense_status", "dense_candidates_ms", "dense_failures", "msa_gbps",
            "dense_gbps", "msa_bytes", "dense_bytes", "msa_bandwidth_fraction", "tokens_per_s",
            "ms_per_query_token", "tokens_per_s_vs_1q", "msa_method", "msa_path", "runs",
            "input_sets", "check_max_abs_diff", "workload", "floor_us", "floor_fraction",
            "peer_ms", "peer_agreement", "msa_over_peer", "peer_skipped", "kernels",
            "peer_kernels"}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def settings(**overrides) -> decode.DecodeSettings:
    values = dict(op="decode-cpu", device=torch.device("cpu"), config=TINY_CONFIG, lengths=(64,),
                  batches=(2,), q_tokens=(1,), index_dtypes=("bf16", "fp8"), dtype=torch.float32,
                  backend="reference", graphs=False, warmup=1, repeats=1, time_budget_s=1.0,
                  dense=True, dense_max_len=None, bandwidth_bytes=1 << 20, seed=0)
    values.update(overrides)
    return decode.DecodeSettings(**values)


# ----------------------------------------------------------------------------------------------
# Byte model and helpers
# ----------------------------------------------------------------------------------------------

def test_byte_model_m3():
    config, n = MSAConfig(), 1 << 20
    selected_kv = 4 * 16 * 128 * 128 * 2 * 2  # G * topk * page * D * (K, V) * bf16
    assert decode.msa_bytes(config, seq_len=n, batch=1, q_tokens=1, index_dtype="bf16") == \
        n * 128 * 2 + selected_kv
    assert decode.msa_bytes(config, seq_len=n, batch=1, q_tokens=1, index_dtype="fp8") == \
        n * (128 + 4) + selected_kv
    # Per query token and per request; the selection is capped by the sequence length.
    assert decode.msa_bytes(config, seq_len=n, batch=3, q_tokens=8, index_dtype="bf16") == \
        3 * (n * 128 * 2 + 8 * selected_kv)
    assert decode.msa_bytes(config, seq_len=1000, batch=1, q_tokens=1, index_dtype="bf16") == \
        1000 * 128 * 2 + 4 * 1000 * 128 * 2 * 2
    assert decode.msa_bytes(config, seq_len=n, batch=1, q_tokens=1, index_dtype="bf16",
                            kv_bytes=4) == n * 128 * 2 + 2 * selected_kv
    assert decode.dense_bytes(config, seq_len=n, batch=2) == 2 * n * 4 * 128 * 2 * 2
    # At 1M, MSA reads ~1/7.9 (bf16) and ~1/15.1 (fp8) of dense's bytes (256 and 132 index bytes
    # per token against 2048 K/V bytes, plus 4 MiB of selected K/V).
    dense = decode.dense_bytes(config, seq_len=n, batch=1)
    bf16 = decode.msa_bytes(config, seq_len=n, batch=1, q_tokens=1, index_dtype="bf16")
    fp8 = decode.msa_bytes(config, seq_len=n, batch=1, q_tokens=1, index_dtype="fp8")
    assert dense / bf16 == pytest.approx(2048 / 260, rel=1e-3)
    assert dense / fp8 == pytest.approx(2048 / 136, rel=1e-3)
    # 4-bit keys: 64 code bytes, 8 e4m3 block scales and a float32 scale per token.
    nvfp4 = decode.msa_bytes(config, seq_len=n, batch=1, q_tokens=1, index_dtype="nvfp4")
    assert nvfp4 == n * (64 + 8 + 4) + selected_kv
    assert dense / nvfp4 == pytest.approx(2048 / 80, rel=1e-3)


def test_gbps_and_input_sets():
    assert decode.gbps(2_000_000, 1.0) == pytest.approx(2.0)
    assert decode.gbps(1, None) is None
    assert decode.num_decode_sets(10, 0) == 1
    assert decode.num_decode_sets(0, 50 << 20) == 1
    assert decode.num_decode_sets(200 << 20, 50 << 20) == 1
    assert decode.num_decode_sets(30 << 20, 50 << 20) == 4
    assert decode.num_decode_sets(1, 50 << 20) == decode.MAX_INPUT_SETS


def test_bottom_right_causal_mask():
    mask = decode.bottom_right_causal_mask(3, 6, "cpu")
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert decode.bottom_right_causal_mask(1, 4, "cpu").all()


def test_cache_set_layout():
    s = settings(index_dtypes=("bf16", "fp8", "fp16", "nvfp4"))
    torch.manual_seed(0)
    cache = decode.make_cache_set(s, seq_len=70, batch=3)  # 5 pages per request, last one partial
    assert cache.k_cache.shape == (15, 16, 2, 16) and cache.pages_per_request == 5
    table = cache.block_table
    assert table.dtype == torch.int32 and table.shape == (3, 6)
    assert (table[:, -1] == -1).all()
    assert sorted(table[:, :-1].flatten().tolist()) == list(range(15))  # every page once
    assert table[:, :-1].flatten().tolist() != list(range(15))  # in a random order
    assert cache.seq_lens.tolist() == [70, 70, 70]
    assert cache.k_cache.abs().min() > 0 or cache.k_cache.std() > 0.5
    keys_fp8, scale, no_block_scale = cache.index["fp8"]
    keys_bf16, none, no_block_scale_bf16 = cache.index["bf16"]
    assert none is None and no_block_scale is None and no_block_scale_bf16 is None
    assert cache.index["fp16"][0].dtype == torch.float16
    assert keys_fp8.dtype == torch.float8_e4m3fn and scale.shape == (15, 16)
    back = dequantize_index_keys(keys_fp8, scale)
    assert ((back - keys_bf16.float()).abs() <= 2 ** -4 * keys_bf16.float().abs() + 1e-6).all()
    # 4-bit keys: the same keys quantised (codes, float32 token scales, e4m3 block scales).
    packed, token_scale, block_scale = cache.index["nvfp4"]
    assert packed.dtype == torch.uint8 and packed.shape == (15, 16, 8)
    assert token_scale.shape == (15, 16) and block_scale.shape == (15, 16, 1)
    expected = quantize_nvfp4(keys_bf16)
    assert torch.equal(packed, expected[0]) and torch.equal(block_scale.float(), expected[1].float())
    assert torch.equal(token_scale, expected[2])
    # The dense copies are the logical sequences of the paged cache.
    k, v = decode.dense_kv(cache)
    assert k.shape == (3, 2, 70, 16) and k.is_contiguous()
    for name, dense in (("k_cache", k), ("v_cache", v)):
        logical, _ = gather_paged(getattr(cache, name), table, cache.seq_lens)
        assert torch.equal(dense.transpose(1, 2).reshape(-1, 2, 16), logical)


@pytest.mark.parametrize("q_tokens", [1, 3])
def test_dense_candidate_is_decode_attention(q_tokens):
    """The dense baseline computes causal decode attention with queries at the last positions."""
    s = settings()
    torch.manual_seed(1)
    cache = decode.make_cache_set(s, seq_len=50, batch=2)
    queries = decode.make_queries(s, 2, q_tokens)
    k, v = decode.dense_kv(cache)
    mask = None if q_tokens == 1 else decode.bottom_right_causal_mask(q_tokens, 50, "cpu")
    x = (decode.dense_queries(queries, 2), k, v, mask)
    for name, fn in decode._dense_candidates(torch.device("cpu"), q_tokens).items():
        out = fn(x, gqa=True)  # [B, H, T, D]
        k_flat, cu_k = gather_paged(cache.k_cache, cache.block_table, cache.seq_lens)
        v_flat, _ = gather_paged(cache.v_cache, cache.block_table, cache.seq_lens)
        expected, _ = reference.dense_attention(queries.q, k_flat, v_flat, queries.cu_seqlens_q,
                                                cu_k, softmax_scale=16 ** -0.5)
        got = out.transpose(1, 2).reshape(-1, 4, 16)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_dense_race_records_candidates():
    s = settings()
    cache = decode.make_cache_set(s, seq_len=64, batch=2)
    results = decode.measure_dense_decode(s, [cache], batch=2, q_tokens_list=(1, 2), num_sets=1)
    for q_tokens in (1, 2):
        result = results[q_tokens]
        assert result.backend == "flash" and result.timing.ms > 0
        assert result.timing_modes == {"flash": "eager"} and result.failures == {}


def test_measure_eager_calls_after():
    seen, after = [], []
    measured = decode.measure(settings(), seen.append, ["a", "b"],
                              after=lambda call: (call(1), after.append(seen[-1])))
    assert measured.mode == "eager" and measured.graph_failure is None
    assert measured.timing.runs >= 1 and after == ["b"]
    assert decode.bandwidth_ceiling_gbps(settings()) > 0


class FakeGraph:
    """Replays ``fn`` on the sets ``i - steps + 1 .. i`` as a graph of ``capture_graphs`` would."""

    def __init__(self, fn, inputs, i, steps):
        self.calls = [inputs[(i - j) % len(inputs)] for j in range(steps - 1, -1, -1)]
        self.fn = fn

    def replay(self):
        for x in self.calls:
            self.fn(x)


def test_measure_graph_branches(monkeypatch):
    """Graph mode (faked on the CPU): replays of graphs of ``steps_per_graph`` steps are timed
    (the last step of graph ``i`` on set ``i``) and ``after`` replays; a capture that fails falls
    back to eager calls and says why."""
    monkeypatch.setattr(decode.DecodeSettings, "use_graphs", property(lambda self: True))
    monkeypatch.setattr(decode, "capture_graphs", lambda fn, inputs, steps: [
        FakeGraph(fn, inputs, i, steps) for i in range(len(inputs))])
    seen, after = [], []
    measured = decode.measure(replace(settings(), steps_per_graph=3), seen.append, ["a", "b"],
                              after=lambda call: (call(0), after.append(seen[-3:])))
    assert measured.mode == "cuda-graph" and measured.graph_failure is None
    assert after == [["a", "b", "a"]]

    def fail(fn, inputs, steps):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(decode, "capture_graphs", fail)
    measured = decode.measure(settings(), seen.append, ["a"])
    assert measured.mode == "eager"
    assert measured.graph_failure == "operation not permitted when stream is capturing"


@needs_paged
def test_dense_out_of_memory_is_recorded(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.50 GiB")

    monkeypatch.setattr(decode, "measure_dense_decode", out_of_memory)
    rows = list(decode.measure_point(settings(), 64, 1, lambda stage: None, bandwidth_gbps=1.0))
    assert [row["index_dtype"] for row in rows] == ["bf16", "fp8"]
    for row in rows:
        assert row["dense_status"] == "failed" and row["speedup"] is None
        assert "out of memory" in row["dense_failures"]["contiguous K/V copies"]
        assert row["msa_ms"] > 0


def test_row_without_dense():
    s = settings()
    msa = decode.MSAResult(decode.Measured(decode.Timing(2.0, 5), "eager"), "functional",
                           "reference/reference", None)
    row = decode.make_row(s, seq_len=1024, batch=4, q_tokens=2, index_dtype="fp8", msa=msa,
                          dense=None, dense_status="off", bandwidth_gbps=10.0, input_sets=1)
    assert ROW_KEYS <= row.keys()
    assert row["speedup"] is None and row["dense_gbps"] is None and row["runs"]["dense"] == 0
    assert row["tokens_per_s"] == pytest.approx(8 / 2e-3)
    assert row["ms_per_query_token"] == pytest.approx(0.25)
    expected_bytes = decode.msa_bytes(TINY_CONFIG, seq_len=1024, batch=4, q_tokens=2,
                                      index_dtype="fp8", kv_bytes=4)
    assert row["msa_bytes"] == expected_bytes
    assert row["msa_gbps"] == pytest.approx(expected_bytes / 2e6)
    assert row["msa_bandwidth_fraction"] == pytest.approx(row["msa_gbps"] / 10.0)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def test_decode_cells_and_plot(tmp_path):
    rows = [dict(seq_len=n, batch=1, q_tokens=1, index_dtype=d, msa_ms=ms, dense_ms=0.5,
                 speedup=0.5 / ms, dense_status="measured", dense_backend="flash",
                 msa_gbps=1234.5, dense_gbps=0.25, msa_bandwidth_fraction=0.9, dense_bandwidth_fraction=None,
                 ms_per_query_token=ms, tokens_per_s=1 / ms * 1e3, tokens_per_s_vs_1q=None,
                 msa_method="cuda-graph")
            for n, ms in ((8192, 0.0213), (1 << 20, 123.4)) for d in ("bf16", "fp8")]
    table = report.format_table(rows, report.DECODE_COLUMNS, report.DECODE_CELLS).splitlines()
    assert table[0].split()[:4] == ["length", "index", "MSA", "ms"]
    first, last = table[2].split(), table[-1].split()
    assert first[:3] == ["8K", "bf16", "0.0213"] and "1,234" in first and "90%" in first
    assert last[:3] == ["1M", "fp8", "123"] and last[-1] == "cuda-graph"
    multi = report.format_table(rows, report.DECODE_MULTI_COLUMNS, report.DECODE_CELLS)
    assert "us/token" in multi and "21.30" in multi
    if importlib.util.find_spec("matplotlib"):
        path = tmp_path / "plot.png"
        assert report.plot_speedup(rows, path, "t", series=lambda row: row["index_dtype"])
        assert path.stat().st_size > 0
    assert not report.plot_speedup([{**rows[0], "speedup": None}], tmp_path / "none.png", "t")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def test_parse_decode_options():
    assert cli.positive_ints("8,1,8,64") == (1, 8, 64)
    assert cli.index_dtypes("fp8,bf16,fp8") == ("fp8", "bf16")
    for bad in ("0", "x", "1,,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.positive_ints(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="fp4"):
        cli.index_dtypes("bf16,fp4")


def test_decode_suites():
    decode_suite, multi = cli.SUITES["decode"], cli.SUITES["decode-multi"]
    assert decode_suite.kind == multi.kind == cli.SUITES["decode-cpu"].kind == "decode"
    assert decode_suite.config == MSAConfig() and decode_suite.batches == (1,)
    assert decode_suite.q_tokens == (1,) and decode_suite.index_dtypes == ("bf16", "fp8")
    assert decode_suite.lengths[0] == 8192 and decode_suite.lengths[-1] == 1 << 20
    assert decode_suite.graphs and decode_suite.device == "cuda"
    assert multi.batches == (8, 32, 64) and multi.q_tokens == (1, 8)
    assert multi.lengths[0] == 4096 and multi.lengths[-1] == 200 * 1024
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "decode-multi", "--batches", "2,1", "--q-tokens", "4,1",
                              "--index-dtypes", "fp8", "--no-graphs", "--lengths", "1k"])
    s = cli._decode_settings(args, multi, parser)
    assert s.batches == (1, 2) and s.q_tokens == (1, 4) and s.index_dtypes == ("fp8",)
    assert not s.graphs and s.lengths == (1024,) and s.dtype == torch.bfloat16
    args = parser.parse_args(["bench", "decode", "--batch", "3"])
    s = cli._decode_settings(args, decode_suite, parser)
    assert s.batches == (3,) and s.graphs and s.bandwidth_bytes == 2048 << 20
    assert s.to_dict()["index_dtypes"] == ["bf16", "fp8"]
    json.dumps(s.to_dict())


@pytest.mark.parametrize("args, message", [
    (["decode"], "needs a CUDA GPU; `msattn bench decode-cpu`"),
    (["decode-multi"], "decode-cpu"),
    (["cpu", "--batches", "2"], "only for the decode suites"),
    (["cpu", "--no-graphs", "--q-tokens", "2"], "--q-tokens, --no-graphs: only for"),
    (["cpu", "--workloads", "random"], "--workloads: only for the decode suites"),
    (["cpu", "--no-peer"], "--no-peer: only for the decode, prefill and prefill-chunked suites"),
    (["train-cpu", "--no-peer"], "--no-peer: only for the decode, prefill"),
    (["cpu", "--no-fp8-index"], "--no-fp8-index: only for the prefill suite"),
    (["decode-cpu", "--shapes", "1x1kx0"], "--shapes: only for the prefill-chunked suites"),
    (["decode-cpu", "--batch", "2", "--batches", "3"], "not both"),
    (["decode-cpu", "--index-dtypes", "int8"], "bad index dtype"),
    (["decode-cpu", "--q-tokens", "0"], "positive"),
])
def test_decode_usage_errors(args, message, capsys, no_cuda):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _run(tmp_path, capsys, *args):
    assert cli.main(["bench", *args, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text()), capsys.readouterr(), path


@needs_paged
def test_decode_cpu_end_to_end(tmp_path, capsys, no_cuda):
    document, output, path = _run(tmp_path, capsys, "decode-cpu", *TINY, "--lengths", "64,100")
    assert path.name.startswith("decode-cpu_cpu_")
    assert {"gpu", "date", "torch", "triton", "command", "suite", "settings", "ceilings",
            "rows"} <= document.keys()
    assert document["suite"] == "decode-cpu" and document["ceilings"]["bandwidth_gbps"] > 0
    rows = document["rows"]
    assert [(r["seq_len"], r["index_dtype"]) for r in rows] == [
        (64, "bf16"), (64, "fp8"), (100, "bf16"), (100, "fp8")]
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert row["op"] == "decode-cpu" and row["batch"] == 1 and row["q_tokens"] == 1
        assert row["msa_method"] == "functional" and row["msa_path"] == "reference/reference"
        assert row["dense_status"] == "measured" and row["dense_backend"] == "flash"
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["msa_ms"])
        assert row["msa_bytes"] == decode.msa_bytes(
            TINY_CONFIG, seq_len=row["seq_len"], batch=1, q_tokens=1,
            index_dtype=row["index_dtype"], kv_bytes=4)
        assert row["msa_gbps"] > 0 and row["tokens_per_s_vs_1q"] == 1.0
        assert row["workload"] == "random" and row["peer_skipped"] == "needs CUDA"
        assert row["peer_ms"] is row["msa_over_peer"] is row["peer_agreement"] is None
        assert row["kernels"] is row["peer_kernels"] is None and row["runs"]["peer"] == 0
        floor_us = row["msa_bytes"] / (document["ceilings"]["bandwidth_gbps"] * 1e3)
        assert row["floor_us"] == pytest.approx(floor_us)
        assert row["floor_fraction"] == pytest.approx(floor_us / (row["msa_ms"] * 1e3))
    out = output.out.splitlines()
    assert out[0].startswith("MSA decode-cpu on CPU") and "bandwidth ceiling" in out[1]
    assert out[2].split()[:4] == ["length", "index", "MSA", "ms"]
    assert out[4].split()[:2] == ["64", "bf16"] and out[7].split()[:2] == ["100", "fp8"]
    assert f"results: {path}" in output.out
    assert "2/3 N=64 B=1: MSA q_tokens=1 random index fp8" in output.err
    if importlib.util.find_spec("matplotlib"):
        assert path.with_suffix(".png").stat().st_size > 0


@needs_paged
def test_decode_multi_on_cpu(tmp_path, capsys, no_cuda):
    document, output, _ = _run(tmp_path, capsys, "decode-cpu", *TINY, "--lengths", "80",
                               "--batches", "1,3", "--q-tokens", "1,4", "--no-dense",
                               "--no-plot", "--workloads", "random,correlated")
    rows = document["rows"]
    # One query token per request is measured once (random); four, per workload.
    points = [(1, "random"), (4, "random"), (4, "correlated")]
    assert len(rows) == 2 * 3 * 2
    keys = [(r["batch"], r["q_tokens"], r["workload"], r["index_dtype"]) for r in rows]
    assert keys == [(b, t, w, d) for b in (1, 3) for t, w in points for d in ("bf16", "fp8")]
    assert document["settings"]["workloads"] == ["random", "correlated"]
    for row in rows:
        assert row["dense_status"] == "off" and row["speedup"] is None
        tokens = row["batch"] * row["q_tokens"]
        assert row["tokens_per_s"] == pytest.approx(tokens / row["msa_ms"] * 1e3)
        single = next(r for r in rows if r["q_tokens"] == 1 and r["batch"] == row["batch"]
                      and r["index_dtype"] == row["index_dtype"])
        assert row["tokens_per_s_vs_1q"] == pytest.approx(row["tokens_per_s"] /
                                                          single["tokens_per_s"])
    assert "dense off" in output.out


@needs_paged
@pytest.mark.skipif(not decode.dispatch.TRITON.available(torch.device("cpu")),
                    reason="needs TRITON_INTERPRET=1 and triton")
def test_wrapper_path_in_interpreter(tmp_path, capsys, no_cuda):
    """The Triton wrapper (plan once, eager runs) through the interpreter, checked against the
    reference backend on request 0."""
    document, _, _ = _run(tmp_path, capsys, "decode-cpu", *TINY, "--backend", "triton",
                          "--lengths", "96", "--batches", "2", "--q-tokens", "1,3",
                          "--repeats", "1", "--no-plot")
    rows = document["rows"]
    assert len(rows) == 4
    for row in rows:
        assert row["msa_method"] == "wrapper" and row["msa_path"] == "MSAPagedWrapper (triton)"
        assert row["check_max_abs_diff"] < 1e-4


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_paged
def test_decode_suite_on_gpu_with_graphs(tmp_path, capsys):
    document, output, _ = _run(tmp_path, capsys, "decode", "--lengths", "4k,8k",
                               "--q-tokens", "1,4", "--warmup", "2", "--repeats", "20",
                               "--time-budget", "0.2", "--no-plot")
    assert document["gpu"] and document["ceilings"]["bandwidth_gbps"] > 100
    for row in document["rows"]:
        assert row["msa_method"] == "cuda-graph", row["msa_graph_failure"]
        assert row["dense_status"] == "measured", row["dense_failures"]
        assert row["check_max_abs_diff"] < 5e-2
        assert 0 < row["msa_bandwidth_fraction"] and row["input_sets"] >= 1
    assert "cuda-graph" in output.out


@pytest.mark.gpu
@pytest.mark.parametrize("q_tokens", [1, 4])
def test_dense_candidates_on_gpu_are_decode_attention(q_tokens):
    s = settings(device=torch.device("cuda"), dtype=torch.bfloat16, graphs=True)
    cache = decode.make_cache_set(s, seq_len=300, batch=2)
    queries = decode.make_queries(s, 2, q_tokens)
    k, v = decode.dense_kv(cache)
    mask = None if q_tokens == 1 else decode.bottom_right_causal_mask(q_tokens, 300, "cuda")
    x = (decode.dense_queries(queries, 2), k, v, mask)
    k_flat, cu_k = gather_paged(cache.k_cache, cache.block_table, cache.seq_lens)
    v_flat, _ = gather_paged(cache.v_cache, cache.block_table, cache.seq_lens)
    expected, _ = reference.dense_attention(queries.q, k_flat, v_flat, queries.cu_seqlens_q, cu_k,
                                            softmax_scale=16 ** -0.5)
    for name, fn in decode._dense_candidates(torch.device("cuda"), q_tokens).items():
        for gqa in (True, False):
            try:
                out = fn(x if gqa else decode._expanded(x, 2), gqa=gqa)
            except Exception:  # a kernel that cannot run this is recorded by the benchmark
                continue
            got = out.transpose(1, 2).reshape(-1, 4, 16).float()
            torch.testing.assert_close(got, expected.float(), atol=2e-2, rtol=2e-2,
                                       msg=f"{name} gqa={gqa}")


# ----------------------------------------------------------------------------------------------
# Workloads, byte floor, kernel breakdown, peer fields
# ----------------------------------------------------------------------------------------------

def test_correlated_workload_structure():
    """Correlated index queries sit within 0.05 * noise of one base per request and group; the
    random ones do not; the attention queries stay random."""
    s = settings(config=TINY_CONFIG)
    torch.manual_seed(3)
    random = decode.make_queries(s, 3, 8, "random")
    correlated = decode.make_queries(s, 3, 8, "correlated")
    for x in (random, correlated):
        assert x.qi.shape == (24, 2, 16) and x.q.shape == (24, 4, 16)
        assert x.cu_seqlens_q.tolist() == [0, 8, 16, 24]
    qi = correlated.qi.view(3, 8, 2, 16)
    spread = (qi - qi.mean(dim=1, keepdim=True)).std()
    assert 0.03 < spread < 0.07  # the noise, scaled by CORRELATED_NOISE
    assert qi.mean(dim=1).std() > 0.5  # the bases are random
    # Different requests and groups have different bases.
    assert (qi[0, 0, 0] - qi[1, 0, 0]).abs().mean() > 0.3
    assert (qi[0, 0, 0] - qi[0, 0, 1]).abs().mean() > 0.3
    assert random.qi.view(3, 8, 2, 16).std(dim=1).mean() > 0.5
    assert correlated.q.view(3, 8, 4, 16).std(dim=1).mean() > 0.5
    with pytest.raises(ValueError, match="workload"):
        decode.make_queries(s, 1, 2, "sorted")


def test_workloads_for():
    s = settings(workloads=("random", "correlated"))
    assert s.workloads_for(1) == ("random",) and s.workloads_for(4) == ("random", "correlated")
    assert settings(workloads=("correlated",)).workloads_for(1) == ("correlated",)


def test_byte_floor_arithmetic():
    assert decode.byte_floor_us(4_000_000, 2000.0) == pytest.approx(2.0)  # 4 MB at 2 TB/s
    assert decode.byte_floor_us(1, None) is None
    s = settings()
    msa = decode.MSAResult(decode.Measured(decode.Timing(0.004, 5), "cuda-graph"), "cuda-graph",
                           "MSAPagedWrapper (triton)", None)
    peer = decode.PeerResult(measured=decode.Measured(decode.Timing(0.002, 7), "cuda-graph"),
                             agreement=0.75, max_abs_diff=0.01)
    row = decode.make_row(s, seq_len=1024, batch=1, q_tokens=1, index_dtype="bf16", msa=msa,
                          dense=None, dense_status="off", bandwidth_gbps=1000.0, input_sets=1,
                          workload="correlated", peer=peer)
    moved = row["msa_bytes"]
    assert row["floor_us"] == pytest.approx(moved / 1e6)  # bytes / (1000 GB/s) in us
    assert row["floor_fraction"] == pytest.approx(moved / 1e6 / 4.0)  # over a 4 us step
    assert row["floor_fraction"] == pytest.approx(row["msa_bandwidth_fraction"])
    assert row["peer_floor_fraction"] == pytest.approx(moved / 1e6 / 2.0)
    assert row["peer_ms"] == 0.002 and row["msa_over_peer"] == pytest.approx(2.0)
    assert row["peer_agreement"] == 0.75 and row["peer_skipped"] is None
    assert row["peer_method"] == "cuda-graph" and row["runs"]["peer"] == 7
    assert row["workload"] == "correlated"


def test_row_records_why_the_peer_did_not_run():
    s = settings()
    msa = decode.MSAResult(decode.Measured(decode.Timing(2.0, 5), "eager"), "functional",
                           "reference/reference", None)
    peer = decode.measure_peer(s, [], [decode.make_queries(s, 2, 1)], "bf16", q_tokens=1, msa=msa)
    assert peer.skipped == "needs CUDA" and peer.measured is None
    assert decode.measure_peer(settings(peer=False), [], [decode.make_queries(s, 2, 1)], "bf16",
                               q_tokens=1, msa=msa).skipped == "off"
    row = decode.make_row(s, seq_len=64, batch=2, q_tokens=1, index_dtype="bf16", msa=msa,
                          dense=None, dense_status="off", bandwidth_gbps=None, input_sets=1,
                          peer=peer)
    assert row["peer_skipped"] == "needs CUDA"
    assert row["peer_ms"] is row["msa_over_peer"] is row["peer_agreement"] is None
    assert row["floor_us"] is row["floor_fraction"] is None  # no bandwidth ceiling
    assert row["kernels"] is row["kernels_source"] is row["peer_kernels"] is None


def test_peer_skipped_when_its_folder_is_absent(tmp_path, monkeypatch):
    monkeypatch.setenv(decode.vllm_peer.PEER_DIR_ENV, str(tmp_path / "missing"))
    s = settings(device=torch.device("cuda"), config=MSAConfig(num_heads=4, num_kv_heads=2,
                                                               head_dim=16, index_dim=16))
    reason = decode.peer_skip_reason(s, [1, 1])
    assert reason.startswith("vLLM's files are not in") and "missing" in reason
    assert decode.peer_skip_reason(s, [1, 2]).startswith("vLLM's decode needs the same number")
    small_pages = settings(device=torch.device("cuda"))
    assert decode.peer_skip_reason(small_pages, [1]) == "vLLM's pages are 128 tokens, not 16"


def test_short_kernel_names():
    assert decode.short_kernel_name("_decode_index_score_kernel") == "_decode_index_score_kernel"
    assert decode.short_kernel_name(
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>"
        "(int, float*)") == "vectorized_elementwise_kernel"
    assert decode.short_kernel_name("void cutlass::Kernel2<cutlass_80_tensorop>(Params)") == \
        "Kernel2"
    assert len(decode.short_kernel_name("k" * 100)) == 48


def test_breakdown_options():
    parser = cli.build_parser()
    multi = cli.SUITES["decode-multi"]
    assert multi.workloads == ("random", "correlated") and multi.breakdown
    assert cli.SUITES["decode"].workloads == ("random",) and cli.SUITES["decode"].breakdown
    s = cli._decode_settings(parser.parse_args(["bench", "decode-multi"]), multi, parser)
    assert s.workloads == ("random", "correlated") and s.breakdown and s.peer
    args = parser.parse_args(["bench", "decode", "--no-breakdown", "--no-peer", "--workloads",
                              "correlated"])
    s = cli._decode_settings(args, cli.SUITES["decode"], parser)
    assert not s.breakdown and not s.peer and s.workloads == ("correlated",)
    with pytest.raises(argparse.ArgumentTypeError, match="workload"):
        cli.workloads("random,zipf")


def test_kernel_breakdown_falls_back_to_eager_calls(monkeypatch):
    """Graph replays the profiler sees no kernel in are replaced by eager calls."""
    profiled = []

    def profile(call, calls):
        profiled.append(call)
        return {} if call == "replay" else {"kernel": 1.5}

    monkeypatch.setattr(decode, "_profile_kernels_us", profile)
    got = decode.kernel_breakdown("replay", "cuda-graph", "eager")
    assert got == decode.KernelBreakdown({"kernel": 1.5}, "eager") and profiled == ["replay", "eager"]
    assert decode.kernel_breakdown("eager", "eager", "unused").source == "eager"
