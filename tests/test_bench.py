"""The benchmark CLI (msattn.bench): parsing, cost model, statistics, timing, and the CPU suite end
to end at a tiny size."""

import argparse
import io
import json

import pytest
import torch

from msattn.bench import cli, metrics, report
from msattn.bench.dense import measure_dense
from msattn.bench.timing import num_input_sets, time_ms
from msattn.config import MSAConfig

TINY = ["--lengths", "256,512", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
        "--index-dim", "16", "--block-size", "32", "--topk", "3", "--warmup", "1",
        "--repeats", "2"]

ROW_KEYS = {"op", "seq_len", "batch", "index_dtype", "msa_ms", "dense_ms", "speedup", "indexer_ms",
            "attention_ms", "indexer_tflops", "attention_tflops", "dense_backend",
            "peak_memory_gib", "extra_memory_gib", "msa_path", "dense_status", "selection"}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _run(tmp_path, capsys, *extra):
    assert cli.main(["bench", *TINY, "--out", str(tmp_path), *extra]) == 0
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text()), capsys.readouterr(), path


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("4096", 4096), ("8k", 8192), ("16K", 16384),
                                            ("1m", 1 << 20), (" 2M ", 2 << 20)])
def test_parse_length(text, expected):
    assert cli.parse_length(text) == expected


@pytest.mark.parametrize("text", ["", "0", "8g", "1.5k", "-8k", "k"])
def test_parse_length_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_length(text)


def test_parse_lengths_and_format_round_trip():
    lengths = cli.parse_lengths("8k,16k,32k,64k,128k,256k,512k,1m")
    assert lengths == tuple(8192 << i for i in range(8))
    assert [report.format_length(n) for n in lengths] == ["8K", "16K", "32K", "64K", "128K",
                                                          "256K", "512K", "1M"]
    assert report.format_length(1000) == "1000"


def test_cost_model_m3():
    config, n = MSAConfig(), 1 << 20
    assert metrics.indexer_flops(config, n) == n * n * 128 * 4
    assert metrics.sparse_attention_flops(config, n) == 4 * n * 16 * 128 * 128 * 64
    assert metrics.dense_attention_flops(config, n) == 2 * n * n * 128 * 64
    assert metrics.indexer_flops(config, n, batch=3) == 3 * metrics.indexer_flops(config, n)
    assert metrics.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert metrics.tflops(1, None) is None


def test_selection_stats_by_hand():
    # One group, 8 queries, blocks of 2 (4 blocks), topk 2; own block last, -1 padding.
    rows = [[0, -1], [0, -1], [0, 1], [0, 1], [1, 2], [0, 2], [2, 3], [1, 3]]
    indices = torch.tensor(rows, dtype=torch.int32)[None]
    stats = metrics.selection_stats(indices, seq_len=8, block_size=2)
    causal_blocks = [1, 1, 2, 2, 3, 3, 4, 4]
    assert stats["selected_block_fraction"] == pytest.approx(14 / sum(causal_blocks))
    assert stats["full_row_fraction"] == pytest.approx(4 / 8)
    # Unions per query block: {0}, {0, 1}, {0, 1, 2}, {1, 2, 3}.
    assert stats["distinct_blocks_per_query_block"] == pytest.approx((1 + 2 + 3 + 3) / 4)
    attended = [1, 2, 3, 4, 3, 4, 3, 4]  # full earlier blocks + keys <= t of the own block
    assert stats["key_sparsity"] == pytest.approx(1 - sum(attended) / 36)


def test_fp8_agreement_by_hand():
    from msattn.bench.prefill import fp8_agreement

    bf16 = torch.tensor([[[0, 1, 2], [3, 1, -1], [4, -1, -1]]], dtype=torch.int32)
    fp8 = torch.tensor([[[2, 0, 1], [3, 5, -1], [4, -1, -1]]], dtype=torch.int32)
    agreement = fp8_agreement(bf16, fp8)
    assert agreement["rows_identical"] == pytest.approx(2 / 3)  # rows 0 (reordered) and 2
    assert agreement["blocks_in_common"] == pytest.approx(5 / 6)  # all but block 1 of row 1


def test_prefill_fp8_index_fields_on_cpu(no_cuda):
    """The prefill measurement with the fp8 index path (reference backend, tiny shape)."""
    from msattn.bench import prefill

    config = MSAConfig(num_heads=4, num_kv_heads=2, num_index_heads=2, head_dim=16, index_dim=16,
                       block_size=32, topk=3)
    settings = prefill.PrefillSettings(
        op="prefill-cpu", device=torch.device("cpu"), config=config, lengths=(256,), batch=1,
        dtype=torch.float32, backend="reference", warmup=1, repeats=1, time_budget_s=1.0,
        dense=False, dense_max_len=None, fp8_index=True)
    row = prefill.measure_length(settings, 256, lambda text: None)
    assert row["fp8_indexer_ms"] > 0 and row["fp8_msa_ms"] > 0 and row["fp8_speedup"] is None
    assert 0 < row["fp8_agreement"]["blocks_in_common"] <= 1
    assert 0 <= row["fp8_agreement"]["rows_identical"] <= 1
    assert row["peer_skipped"] == "off" and row["peer_ms"] is None and row["msa_over_peer"] is None
    from dataclasses import replace
    assert prefill.peer_skip_reason(replace(settings, peer=True), 256) == "needs CUDA"
    assert prefill.peer_skip_reason(replace(settings, peer=True), 200).startswith(
        "the peer's sequence fills whole 128-token pages")


def test_num_input_sets():
    assert num_input_sets(10, 0) == 1
    assert num_input_sets(100 << 20, 50 << 20) == 1
    assert num_input_sets(30 << 20, 50 << 20) == 4
    assert num_input_sets(1, 50 << 20) == 8


def test_time_ms_cycles_inputs_and_respects_budget():
    seen = []
    timing = time_ms(seen.append, ["a", "b", "c"], device=torch.device("cpu"), warmup=2,
                     repeats=5, budget_s=10.0)
    assert timing.runs == 5 and timing.ms >= 0
    assert seen == ["a", "b", "c", "a", "b", "c", "a"]
    slow = time_ms(lambda x: torch.randn(300, 300) @ torch.randn(300, 300), [None],
                   device=torch.device("cpu"), warmup=5, repeats=50, budget_s=1e-6)
    assert slow.runs == 1


def test_dense_cpu_candidate_and_gqa():
    config = MSAConfig(num_heads=4, num_kv_heads=2, num_index_heads=2, head_dim=16, index_dim=16)
    measure = lambda fn, sets: time_ms(fn, sets, device=torch.device("cpu"), warmup=1, repeats=1,
                                       budget_s=1.0)
    result = measure_dense(config, batch=1, seq_len=64, dtype=torch.float32,
                           device=torch.device("cpu"), l2_bytes=0, measure=measure)
    assert result.timing is not None and result.backend == "flash" and result.failures == {}


def test_progress_lines():
    stream = io.StringIO()
    progress = report.Progress(2, stream=stream)
    progress.step("N=8K")
    progress("indexer")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].endswith("1/2 N=8K: indexer")


def test_output_stem():
    env = {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-22T01:02:03+00:00"}
    assert report.output_stem("prefill", env) == "prefill_nvidia-h100-80gb-hbm3_20261122-010203"


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def test_cpu_suite_end_to_end(tmp_path, capsys, no_cuda):
    document, output, path = _run(tmp_path, capsys, "--no-plot")
    assert path.name.startswith("prefill-cpu_cpu_")
    assert {"gpu", "date", "torch", "triton", "command", "ceilings", "rows"} <= document.keys()
    assert document["command"][:2] == ["msattn", "bench"]
    assert document["ceilings"]["matmul_tflops"] > 0
    assert document["settings"]["config"]["topk"] == 3
    rows = document["rows"]
    assert [row["seq_len"] for row in rows] == [256, 512]
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert row["op"] == "prefill-cpu" and row["msa_path"] == "reference"
        assert row["dense_status"] == "measured" and row["dense_backend"] == "flash"
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["msa_ms"])
        assert row["indexer_ms"] > 0 and row["attention_ms"] > 0 and row["indexer_tflops"] > 0
        assert row["peak_memory_gib"] is None
        assert 0 < row["selection"]["selected_block_fraction"] < 1
        assert 0 < row["selection"]["key_sparsity"] < 1
    # 256 tokens = 8 blocks, top-3: the first 3 query blocks are dense.
    assert rows[0]["selection"]["full_row_fraction"] == pytest.approx(3 / 8)
    table = output.out.splitlines()
    assert table[2].split()[:5] == ["length", "full", "rows", "blocks", "selected"]
    assert table[4].split()[0] == "256" and table[5].split()[0] == "512"
    assert f"results: {path}" in output.out
    assert "2/3 N=256: indexer" in output.err


def test_dense_skipped_and_off(tmp_path, capsys, no_cuda):
    document, output, _ = _run(tmp_path, capsys, "--no-plot", "--dense-max-len", "256")
    first, second = document["rows"]
    assert first["dense_status"] == "measured" and first["speedup"] is not None
    assert second["dense_status"] == "skipped" and second["speedup"] is None
    assert second["dense_ms"] is None and second["runs"]["dense"] == 0
    assert "dense skipped" in output.out

    off = tmp_path / "off"
    cli.main(["bench", "cpu", *TINY, "--no-dense", "--no-plot", "--out", str(off)])
    (path,) = off.glob("*.json")
    assert {row["dense_status"] for row in json.loads(path.read_text())["rows"]} == {"off"}


def test_plot_written(tmp_path, capsys, no_cuda):
    pytest.importorskip("matplotlib")
    _, output, path = _run(tmp_path, capsys)
    assert path.with_suffix(".png").stat().st_size > 0
    assert "plot:" in output.out


@pytest.mark.parametrize("args, message", [
    (["prefill"], "needs a CUDA GPU"),
    (["--heads", "6", "--kv-heads", "4"], "multiple of num_kv_heads"),
    (["--lengths", "8x"], "bad length"),
    (["--backend", "nope"], "invalid choice"),
])
def test_usage_errors(args, message, capsys, no_cuda):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.gpu
def test_prefill_suite_on_gpu_with_reference_backend(tmp_path, capsys):
    document, output, _ = _run(tmp_path, capsys, "prefill", "--backend", "reference", "--no-plot")
    assert document["gpu"] and document["ceilings"]["matmul_tflops"] > 0
    for row in document["rows"]:
        assert row["op"] == "prefill" and row["peak_memory_gib"] > 0
        assert row["extra_memory_gib"] >= 0
        assert row["dense_status"] == "measured", row["dense_failures"]
    assert "indexer TFLOP/s" in output.out


def test_parse_chunk_shapes():
    assert cli.parse_chunk_shapes("1x2kx64k,4x512x0") == ((1, 2048, 65536), (4, 512, 0))
    for bad in ("1x2k", "0x2kx1k", "1x0x1k"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_chunk_shapes(bad)


def test_chunked_cpu_suite_end_to_end(tmp_path, capsys, no_cuda):
    """Chunks against paged prefixes through msa_paged_attention (reference backend): one row
    per shape, the peer off on the CPU; --shapes only for this suite."""
    assert cli.main(["bench", "prefill-chunked-cpu", "--shapes", "1x64x0,2x32x100", "--no-plot",
                     "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    document = json.loads(path.read_text())
    rows = document["rows"]
    assert [(r["requests"], r["chunk"], r["prefix"]) for r in rows] == [(1, 64, 0), (2, 32, 100)]
    for row in rows:
        assert row["op"] == "prefill-chunked-cpu" and row["msa_ms"] > 0
        assert row["peer_skipped"] == "off" and row["msa_over_peer"] is None
        assert row["tokens_per_s"] == pytest.approx(row["requests"] * row["chunk"] / row["msa_ms"] * 1e3)
    assert document["settings"]["shapes"] == [[1, 64, 0], [2, 32, 100]]
    out = capsys.readouterr().out
    assert "2x32x100" in out and "MSA / vLLM" in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "cpu", "--shapes", "1x64x0"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "prefill-chunked-cpu", "--lengths", "1k"])


def test_max_abs_diff_in_row_chunks():
    a = torch.randn(10, 3, 4, dtype=torch.bfloat16)
    b = torch.randn(10, 3, 4, dtype=torch.bfloat16)
    expected = float((a.float() - b.float()).abs().max())
    assert expected > 0
    assert metrics.max_abs_diff(a, b, rows=3) == expected == metrics.max_abs_diff(a, b)
    assert metrics.max_abs_diff(a[:0], b[:0]) == 0.0
    assert metrics.max_abs_diff(torch.tensor(1.5), torch.tensor(-1.0)) == 2.5  # 0-d (a loss)
