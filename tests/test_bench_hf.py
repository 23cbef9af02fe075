"""The transformers benchmark (msattn bench hf / hf-cpu): the CPU suite end to end at tiny sizes,
out-of-memory rows, and a short GPU run."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("transformers.models.minimax_m3_vl")

from msattn.bench import cli, hf  # noqa: E402

ROW_KEYS = {"op", "mode", "seq_len", "batch", "impl", "status", "ms", "peak_gib", "extra_gib",
            "speedup", "tokens_per_s", "runs", "error"}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_hf_cpu_suite_end_to_end(tmp_path, capsys, no_cuda):
    assert cli.main(["bench", "hf-cpu", "--out", str(tmp_path), "--no-plot"]) == 0
    (path,) = tmp_path.glob("*.json")
    assert path.name.startswith("hf-cpu_cpu_")
    document = json.loads(path.read_text())
    assert {"gpu", "device", "date", "torch", "triton", "python", "transformers", "command",
            "suite", "settings", "rows"} <= document.keys()
    assert document["settings"]["num_layers"] == 3
    rows = document["rows"]
    assert [(r["mode"], r["seq_len"], r["impl"]) for r in rows] == [
        ("prefill", 64, "sdpa"), ("prefill", 64, "msattn"), ("prefill", 128, "sdpa"),
        ("prefill", 128, "msattn"), ("generate", 96, "sdpa"), ("generate", 96, "msattn")]
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert row["op"] == "hf-cpu" and row["status"] == "ok", row["error"]
        assert row["ms"] > 0 and row["peak_gib"] is None
        if row["mode"] == "prefill":
            assert row["tokens_per_s"] > 0
            assert row["sparse_layer_ms"] is None and row["full_layer_ms"] is None  # CUDA only
        else:  # decode tokens/s is None when timing noise hides the n - 1 extra steps (CPU load)
            assert row["e2e_tokens_per_s"] > 0
            assert row["tokens_per_s"] is None or row["tokens_per_s"] > 0
    for sdpa, ours in zip(rows[::2], rows[1::2]):
        assert sdpa["speedup"] is None
        assert ours["speedup"] == pytest.approx(sdpa["ms"] / ours["ms"])
    generate = rows[-1]
    assert generate["new_tokens"] == 4 and generate["generate_1_ms"] > 0
    if generate["decode_ms_per_token"] is not None:
        assert generate["decode_ms_per_token"] == pytest.approx(
            (generate["ms"] - generate["generate_1_ms"]) / 3)
    output = capsys.readouterr()
    assert "MiniMaxM3VLForCausalLM hf-cpu" in output.out and f"results: {path}" in output.out
    assert "generate N=96: generate msattn, 4 new tokens" in output.err


def test_msattn_only_and_options(tmp_path, capsys, no_cuda):
    assert cli.main(["bench", "hf-cpu", "--impls", "msattn", "--lengths", "48", "--gen-lengths",
                     "40", "--new-tokens", "2", "--layers", "2", "--out", str(tmp_path),
                     "--no-plot"]) == 0
    (path,) = tmp_path.glob("*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["mode"], r["impl"], r["status"]) for r in rows] == [
        ("prefill", "msattn", "ok"), ("generate", "msattn", "ok")]
    assert all(r["speedup"] is None for r in rows)


def test_out_of_memory_is_a_row():
    settings = hf.HFSettings(
        op="hf-cpu", device=torch.device("cpu"), config=cli.SUITES["hf-cpu"].config,
        lengths=(64,), gen_lengths=(), new_tokens=2, hidden_size=64, num_layers=2, vocab_size=128,
        mlp_size=32, dtype=torch.float32, backend="reference", warmup=1, repeats=1,
        time_budget_s=1.0)

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 TiB")

    measured = hf.measure_call(settings, oom)
    assert measured.status == "oom" and measured.timing is None
    assert "out of memory" in measured.error
    row = hf._row(settings, "prefill", 64, "sdpa", measured)
    assert row["status"] == "oom" and row["ms"] is None
    assert "oom" in hf.format_table([{**row, "tokens_per_s": None}])
    failed = hf.measure_call(settings, lambda: 1 / 0)
    assert failed.status == "error" and "ZeroDivisionError" in failed.error


def test_hf_usage_errors(capsys, no_cuda):
    with pytest.raises(SystemExit):
        cli.main(["bench", "hf"])
    assert "hf-cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "hf-cpu", "--layers", "1"])
    assert "at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "cpu", "--new-tokens", "3"])
    assert "only for the hf suites" in capsys.readouterr().err


@pytest.mark.gpu
def test_hf_suite_on_gpu(tmp_path, capsys):
    args = ["bench", "hf", "--lengths", "2k,8k", "--gen-lengths", "4k", "--new-tokens", "4",
            "--layers", "2", "--warmup", "1", "--repeats", "2", "--time-budget", "1",
            "--out", str(tmp_path), "--no-plot"]
    assert cli.main(args) == 0
    (path,) = tmp_path.glob("*.json")
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 6
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert row["peak_gib"] > 0 and row["ms"] > 0
    assert all(r["speedup"] > 0 for r in rows if r["impl"] == "msattn")
    for row in rows:
        if row["mode"] == "prefill":  # one MSA layer and the full layer, timed inside the model
            assert 0 < row["sparse_layer_ms"] < row["ms"] and 0 < row["full_layer_ms"] < row["ms"]
            if row["impl"] == "msattn":
                assert row["sparse_layer_speedup"] > 0
    assert "speedup" in capsys.readouterr().out
